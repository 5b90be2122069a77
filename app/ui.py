"""The Gradio layout: inputs -> engine run (pruned and dense) -> renderers -> views.

The model is loaded once and passed in; everything a request produces lives in that request's return values
and in the browser session's gr.State, never in module globals, so concurrent users cannot see each other.
"""

from __future__ import annotations

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

from sparsevlm.config import FIXED_BUDGETS, PruneConfig
from sparsevlm.errors import SparseVLMError
from sparsevlm.images import load_image
from sparsevlm.methods import METHODS
from sparsevlm.trace import PruneTrace

from . import render

log = logging.getLogger("sparsevlm.app")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES_DIR = ROOT / "assets" / "examples"

# What each method ranks by, shown in the method picker; the list itself comes from the engine's registry.
_METHOD_HINTS = {
    "sparsevlm": "SparseVLM (text-guided)",
    "fastv": "FastV (last-token attention)",
    "fastervlm": "FasterVLM ([CLS] attention)",
    "sparsevlm-v2": "SparseVLM v2 (gravity-corrected, priority heads)",
    "visionzip": "VisionZip ([CLS] attention + merged context)",
    "divprune": "DivPrune (most diverse tokens)",
    "pyramiddrop": "PyramidDrop (last-token attention, in stages)",
    "dart": "DART (drop duplicates of pivot tokens)",
}
METHOD_CHOICES = [(_METHOD_HINTS.get(m, render.METHOD_LABELS.get(m, m)), m) for m in METHODS if m != "dense"]
METHOD_CHOICES.append(("Dense (no pruning)", "dense"))
COMPARE_METHODS = METHODS  # dense first, then every registered method
COUNT_CHOICES = [
    ("Fixed budget (equal tokens)", "fixed"),
    ("Adaptive - paper eq. 8 (λ)", "paper"),
    ("Adaptive - reference code (scale, bias)", "code"),
]
MAX_QUESTION_CHARS = 2000

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
    image: Image.Image
    pruned: PruneTrace
    dense: PruneTrace | None
    budget: int


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


def _user_error(exc: BaseException) -> gr.Error:
    if isinstance(exc, gr.Error):
        return exc
    if isinstance(exc, SparseVLMError):
        return gr.Error(str(exc), title="Cannot run this")
    log.error("unexpected failure:\n%s", traceback.format_exc())
    return gr.Error(f"Something went wrong inside the engine ({type(exc).__name__}: {exc}). The app is still up; "
                    "try another image or setting.", title="Internal error")


def build_config(method: str, budget: Any, count_mode: str, lam: float, scale: float, bias: float,
                 recycle: bool) -> PruneConfig:
    try:
        budget_i = int(budget)
    except (TypeError, ValueError):
        raise gr.Error(f"budget must be a whole number of tokens, not {budget!r}") from None
    return PruneConfig(method=method, budget=budget_i, count_mode=count_mode or "fixed", lam=float(lam),
                       scale=float(scale), bias=float(bias), recycle=bool(recycle))


def check_question(question: Any) -> str:
    if not isinstance(question, str) or not question.strip():
        raise gr.Error("Please type a question about the image (it is empty).", title="No question")
    q = question.strip()
    if len(q) > MAX_QUESTION_CHARS:
        raise gr.Error(f"The question is {len(q)} characters long; keep it under {MAX_QUESTION_CHARS}.",
                       title="Question too long")
    return q


def reachable_budget(lm: Any) -> float | None:
    """The smallest equal-token budget SparseVLM's default schedule can reach on this model (None if unknown)."""
    try:
        from sparsevlm.schedule import min_equal_tokens, sparsevlm_layers

        depth = int(lm.num_layers)
        return min_equal_tokens(int(lm.visual_tokens), sparsevlm_layers(PruneConfig(), depth)[0], depth)
    except (ImportError, AttributeError, TypeError, ValueError, IndexError):
        return None


def build_app(lm: Any, examples: list[dict] | None = None, run_fn: Any = None) -> gr.Blocks:
    """The whole UI for one loaded model. run_fn defaults to sparsevlm.pipeline.run."""
    if run_fn is None:
        from sparsevlm.pipeline import run as run_fn
    examples = load_examples() if examples is None else examples
    grid_tokens = int(getattr(lm, "visual_tokens", 0)) or None

    def execute(image_src: Any, question: Any, config: PruneConfig, max_new_tokens: Any, with_dense: bool,
                progress: gr.Progress | None = None) -> RunOutput:
        q = check_question(question)
        image = load_image(image_src)
        config.validate(grid_tokens)
        n_new = max(1, min(int(max_new_tokens or 16), 64))
        if progress is not None:
            progress(0.1, desc=f"running {render.METHOD_LABELS.get(config.method, config.method)}")
        pruned = run_fn(lm, image, q, config, max_new_tokens=n_new).trace
        dense = None
        if with_dense and config.method != "dense":
            if progress is not None:
                progress(0.55, desc="running dense for comparison")
            dense = run_fn(lm, image, q, PruneConfig(method="dense"), max_new_tokens=n_new).trace
        elif config.method == "dense":
            dense = pruned
        return RunOutput(image=image, pruned=pruned, dense=dense, budget=config.budget)

    # --- event handlers (all state arrives as arguments and leaves as return values) -------------------------
    def explain(image_src, question, method, budget, count_mode, lam, scale, bias, recycle, max_new_tokens,
                view, progress=gr.Progress()):  # noqa: B008 - Gradio injects it
        try:
            cfg = build_config(method, budget, count_mode, lam, scale, bias, recycle)
            out = execute(image_src, question, cfg, max_new_tokens, True, progress)
            progress(0.9, desc="drawing")
            return views(out, view)
        except Exception as exc:
            raise _user_error(exc) from exc

    def views(out: RunOutput, view: str) -> tuple:
        tr, dense = out.pruned, out.dense
        layer = render.default_layer(tr)
        n_layers = render.num_layers(tr)
        state = {"image": out.image, "pruned": tr.to_dict(), "dense": dense.to_dict() if dense else None}
        if tr.raters:
            rater_note = (f"{sum(r.rater for r in tr.raters)} of {len(tr.raters)} tokens after the image are "
                          "raters (red): their relevance score R is above the mean. Purple tokens are below it.")
        else:
            rater_note = (f"{render.METHOD_LABELS.get(tr.method, tr.method)} does not use text raters; switch the "
                          "method to SparseVLM to see them.")
        return (
            render.answer_markdown(tr, dense),
            render.rater_highlights(tr),
            rater_note,
            render.raters_figure(tr),
            render.render_view(out.image, tr, layer, view),
            gr.Slider(minimum=0, maximum=max(0, n_layers - 1), value=layer, step=1, interactive=n_layers > 1),
            render.layer_caption(tr, layer),
            render.counts_figure(tr, budget=out.budget if tr.method != "dense" else None),
            render.formulas_markdown(tr),
            pd.DataFrame(render.latency_rows(tr, dense), columns=render.LATENCY_HEADERS),
            render.latency_figure(tr, dense),
            {"pruned": tr.summary(), "dense": dense.summary() if dense is not None else None},
            state,
        )

    def show_layer(state, layer, view):
        if not state or not state.get("pruned"):
            raise gr.Error("Run the model first: pick an example or upload an image and press Run.")
        tr = PruneTrace.from_dict(state["pruned"])
        layer = int(max(0, min(int(layer or 0), render.num_layers(tr) - 1)))
        return render.render_view(state["image"], tr, layer, view), render.layer_caption(tr, layer)

    def step_layer(state, layer, view):
        if not state or not state.get("pruned"):
            return gr.Timer(active=False), gr.skip(), gr.skip(), gr.skip()
        tr = PruneTrace.from_dict(state["pruned"])
        n = render.num_layers(tr)
        nxt = int(layer or 0) + 1
        if nxt >= n:
            return gr.Timer(active=False), gr.skip(), gr.skip(), gr.skip()
        return (gr.Timer(active=True), nxt, render.render_view(state["image"], tr, nxt, view),
                render.layer_caption(tr, nxt))

    def compare(image_src, question, budget, max_new_tokens, progress=gr.Progress()):  # noqa: B008 - Gradio injects it
        try:
            check_question(question)
            image = load_image(image_src)
            results: list[tuple[str, PruneTrace | None, str]] = []
            gallery = []
            for i, method in enumerate(COMPARE_METHODS):
                progress(i / len(COMPARE_METHODS), desc=f"running {render.METHOD_LABELS[method]}")
                cfg = build_config(method, budget, "fixed", 1.0, 13.5, 0.0, True)
                try:
                    tr = execute(image, question, cfg, max_new_tokens, False).pruned
                except SparseVLMError as exc:  # e.g. FasterVLM on a vision tower without [CLS]
                    results.append((method, None, str(exc)))
                    continue
                results.append((method, tr, ""))
                gallery.append((render.render_layer(image, tr, render.final_layer(tr), max_side=384),
                                render.compare_caption(method, tr)))
            return gallery, pd.DataFrame(render.compare_rows(results), columns=render.COMPARE_HEADERS)
        except Exception as exc:
            raise _user_error(exc) from exc

    def export(state):
        if not state or not state.get("pruned"):
            raise gr.Error("Nothing to export yet: run the model first.")
        tr = PruneTrace.from_dict(state["pruned"])
        folder = Path(tempfile.mkdtemp(prefix="sparsevlm-export-"))
        stamp = time.strftime("%Y%m%d-%H%M%S")
        trace_path = folder / f"trace-{tr.method}-{stamp}.json"
        trace_path.write_text(tr.to_json(indent=1))
        gif_path = folder / f"pruning-{tr.method}-{stamp}.gif"
        gif_path.write_bytes(render.pruning_animation(state["image"], tr))
        files = [str(trace_path), str(gif_path)]
        if state.get("dense") and tr.method != "dense":
            dense_path = folder / f"trace-dense-{stamp}.json"
            dense_path.write_text(PruneTrace.from_dict(state["dense"]).to_json(indent=1))
            files.append(str(dense_path))
        return files, str(gif_path)

    # --- layout --------------------------------------------------------------------------------------------
    model_line = (f"Model: <b>{getattr(lm, 'name', '?')}</b> · {getattr(lm, 'arch', '?')} · "
                  f"{getattr(lm, 'num_layers', '?')} decoder layers · grid {getattr(lm, 'grid', ('?', '?'))[0]}×"
                  f"{getattr(lm, 'grid', ('?', '?'))[1]} = {grid_tokens} visual tokens · "
                  f"{getattr(lm, 'device', '?')} / {str(getattr(lm, 'dtype', '?')).replace('torch.', '')}")
    budgets = list(FIXED_BUDGETS)
    reachable = reachable_budget(lm)
    # Default to the papers' headline budget when this model's depth can reach it, else the smallest one it can.
    fitting = [b for b in budgets if reachable is None or b >= reachable]
    default_budget = 64 if 64 in fitting else (min(fitting) if fitting else max(budgets))
    budget_info = f"mean visual tokens per decoder layer (dense = {grid_tokens})"
    if reachable is not None and reachable > min(budgets):
        budget_info += f"; this model's depth cannot go below {reachable:.0f}"

    with gr.Blocks(title="SparseVLM Explorer") as demo:
        state = gr.State(None)
        gr.HTML(INTRO)
        gr.HTML(f"<div class='sv-model'>{model_line}</div>")
        with gr.Row(equal_height=False):
            with gr.Column(scale=4, min_width=320):
                image_in = raw_image_input(label="Image", height=300, elem_id="sv-image",
                                    sources=["upload", "clipboard"])
                question_in = gr.Textbox(label="Question", placeholder="e.g. What colour is the circle?",
                                         lines=1, max_lines=4, elem_id="sv-question")
                run_btn = gr.Button("Run: prune and explain", variant="primary", elem_id="sv-run")
                if examples:
                    ex = gr.Examples([[e["image"], e["question"]] for e in examples], inputs=[image_in, question_in],
                                     label="Examples - one click runs it", examples_per_page=6,
                                     elem_id="sv-examples")
                else:
                    ex = None
                    gr.Markdown("_No examples found in assets/examples/examples.json._")
                method_in = gr.Radio(METHOD_CHOICES, value="sparsevlm", label="Pruning method",
                                     elem_id="sv-method")
                budget_in = gr.Radio(budgets, value=default_budget, label="Budget: equal tokens",
                                     info=budget_info + "; adaptive modes under SparseVLM options",
                                     elem_id="sv-budget")
                with gr.Accordion("SparseVLM options", open=False):
                    count_in = gr.Radio(COUNT_CHOICES, value="fixed", label="How many tokens to drop")
                    lam_in = gr.Slider(0.0, 1.0, value=1.0, step=0.05, label="λ (paper eq. 8)",
                                       info="deleted = ⌊λ·(tokens − rank(P))⌋")
                    with gr.Row():
                        scale_in = gr.Number(value=13.5, label="scale (reference code)",
                                             info="kept = rank(P)·scale + bias")
                        bias_in = gr.Number(value=0.0, label="bias")
                    recycle_in = gr.Checkbox(value=True, label="Recycle deleted tokens (cluster + merge)")
                max_new_in = gr.Slider(1, 64, value=8, step=1, label="Max new tokens")
            with gr.Column(scale=6, min_width=420):
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
                                   elem_id="sv-view")
                caption_out = gr.Markdown(elem_id="sv-caption")
                gr.HTML(render.legend_html())
        with gr.Tabs():
            with gr.Tab("① Text raters", id="raters"):
                gr.Markdown("Every token after the image (question + answer prompt) gets a relevance score R: how "
                            "much the visual tokens, on average, point at it. Tokens above the mean become **text "
                            "raters**; only their attention decides which visual tokens survive.",
                            elem_classes="sv-help")
                raters_out = gr.HighlightedText(label="Text raters (red = rater, stronger = higher R)",
                                                show_legend=True, elem_id="sv-raters")
                raters_note = gr.Markdown()
                raters_fig = gr.Plot(label="R per token (computed)", elem_id="sv-raters-fig")
            with gr.Tab("② Token counts", id="counts"):
                counts_fig = gr.Plot(label="Visual tokens per layer (computed)", elem_id="sv-counts")
                formulas_out = gr.Markdown(elem_id="sv-formulas")
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
                                             elem_id="sv-compare-table")
            with gr.Tab("⑤ Export", id="export"):
                export_btn = gr.Button("Export trace JSON + pruning animation", elem_id="sv-export")
                with gr.Row():
                    export_files = gr.File(label="Downloads", file_count="multiple", elem_id="sv-export-files")
                    export_gif = gr.Image(label="Pruning through the layers (GIF)", type="filepath",
                                          interactive=False, elem_id="sv-export-gif")
            with gr.Tab("Raw trace", id="raw"):
                summary_out = gr.JSON(label="Trace summary (what the CLI prints with --json)")

        explain_inputs = [image_in, question_in, method_in, budget_in, count_in, lam_in, scale_in, bias_in,
                          recycle_in, max_new_in, view_in]
        explain_outputs = [answer_out, raters_out, raters_note, raters_fig, overlay_out, layer_in, caption_out,
                           counts_fig, formulas_out, latency_out, latency_fig, summary_out, state]
        run_btn.click(explain, explain_inputs, explain_outputs, api_name="explain", concurrency_id="model")
        question_in.submit(explain, explain_inputs, explain_outputs, api_visibility="private",
                           concurrency_id="model")
        if ex is not None:
            ex.load_input_event.then(explain, explain_inputs, explain_outputs, api_visibility="private",
                                     concurrency_id="model")
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
        compare_btn.click(compare, [image_in, question_in, budget_in, max_new_in], [compare_gallery, compare_table],
                          api_name="compare", concurrency_id="model")
        export_btn.click(export, [state], [export_files, export_gif], api_name="export", concurrency_limit=2)
    return demo


def launch_kwargs() -> dict:
    return {"css": CSS, "theme": gr.themes.Soft(primary_hue="indigo", neutral_hue="slate")}
