"""The Gradio page: components laid out in parts, then wired to the handlers (app/handlers.py).

Nothing here computes: the handlers run the engine and the renderers (app/render/) draw; this module only
places components and connects events. Everything a request produces travels in return values and the browser
session's gr.State (plain data), never in module globals, so concurrent users cannot see each other.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from sparsevlm.config import ACCOUNTINGS
from sparsevlm.loading import LoadedModel, ModelCache
from sparsevlm.methods import METHODS
from sparsevlm.options import Option
from sparsevlm.scenes.world import FAMILIES

from . import render
from .handlers import (
    DEFAULTS,
    VIEW_NAMES,
    Handlers,
    PageOption,
    budget_choice,
    compare_note,
    explain_params,
    load_examples,
    model_choices,
    model_line,
    model_world,
    next_examples,
    option_groups,
    run_params,
    studio_world,
    world_choices,
)

METHOD_CHOICES = [(render.method_label(m, long=True), m) for m in METHODS]
SLIDER_STEPS = 200  # a bounded float option's slider: its range in this many steps
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
.sv-knows {font-size: .85rem; margin-top: .25rem}
.sv-upload {border-left: 3px solid #d97706; padding-left: .5rem}
.sv-likeness {font-size: .85rem} .sv-likeness-table td, .sv-likeness-table th {padding: 2px 8px}
.sv-help {font-size: .9rem; color: var(--body-text-color-subdued)}
.sv-probes p {margin: .35rem 0; font-size: .9rem; line-height: 1.4}
.sv-probe-strip {display: block; margin: .3rem 0}
#sv-overlay img {object-fit: contain}
#sv-compare-gallery .grid-wrap, #sv-compare-gallery .gallery-container, #sv-token-attention .grid-wrap,
#sv-token-attention .gallery-container {max-height: none !important; height: auto !important;
  overflow: visible !important}
#sv-compare-gallery .caption-label, #sv-token-attention .caption-label {white-space: normal !important;
  overflow: visible !important}
.sv-table {width: 100%; border-collapse: collapse; font-size: .88rem}
.sv-table th, .sv-table td {padding: .3rem .55rem; border-bottom: 1px solid var(--border-color-primary);
  text-align: left; vertical-align: top}
.sv-table th {font-weight: 600; background: var(--background-fill-secondary); cursor: help}
.sv-table td.sv-num {text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap}
.sv-table-legend {font-size: .82rem; color: var(--body-text-color-subdued); margin: .4rem 0 0 1rem; padding: 0}
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


# --- the page, in parts --------------------------------------------------------------------------------------------
def model_bar(h: Handlers, first: LoadedModel) -> dict[str, Any]:
    with gr.Row(equal_height=True):
        public = bool(h.models.access and h.models.access.public)  # no hub ids beyond the presets and the cache
        picker = gr.Dropdown(model_choices(h.default_model), value=h.default_model, allow_custom_value=True,
                             label="Model: a preset or a local model" if public else
                             "Model: a preset, a Hugging Face hub id or a local folder", scale=5,
                             elem_id="sv-model-picker")
        load = gr.Button("Load model", scale=1, min_width=120, elem_id="sv-load")
    line = gr.HTML(model_line(first), label="Model", elem_id="sv-model")
    return {"model_in": picker, "load_btn": load, "model_out": line}


def studio_box(first: LoadedModel) -> dict[str, Any]:
    with gr.Accordion("Scene studio: a generated scene whose ground truth is known", open=True):
        with gr.Row(equal_height=True):
            seed = gr.Number(value=0, precision=0, minimum=0, maximum=2**31 - 1, label="Seed", elem_id="sv-seed",
                             min_width=90)
            family = gr.Dropdown(list(FAMILIES), value=FAMILIES[0], label="Question family",
                                 elem_id="sv-family", min_width=120)
            world = gr.Dropdown(world_choices(model_world(first)), value=studio_world(first), label="World",
                                elem_id="sv-world", min_width=160,
                                info="whose pictures: the model's own first")
            button = gr.Button("New random scene", elem_id="sv-new-scene", min_width=140)
        truth = gr.HTML("", elem_id="sv-truth")
    return {"seed_in": seed, "family_in": family, "world_in": world, "scene_btn": button, "truth_out": truth}


def method_inputs(first: LoadedModel) -> dict[str, Any]:
    c: dict[str, Any] = {}
    c["method_in"] = gr.Radio(METHOD_CHOICES, value=DEFAULTS.method, label="Pruning method", elem_id="sv-method")
    c["budget_in"] = budget_choice(first, label="Budget: equal tokens", elem_id="sv-budget")
    c["accounting_in"] = gr.Radio(list(ACCOUNTINGS), value=DEFAULTS.accounting,
                                  label="Accounting: how a budget is counted",
                                  info="paper: the published settings (a pruning layer counts at its output); "
                                       "flops: every method at the same input-counted cost",
                                  elem_id="sv-accounting")
    c["option_groups"] = {}
    for method, options in option_groups().items():
        # one group per method with page options, shown while that method is chosen
        with gr.Accordion(f"{render.method_label(method)} options", open=False, visible=method == DEFAULTS.method,
                          elem_id=f"sv-options-{method}") as group:
            for po in options:
                c[option_key(po.param)] = option_component(po)
        c["option_groups"][method] = group
    c["max_new_in"] = gr.Slider(1, MAX_NEW_TOKENS_UI, value=8, step=1, label="Max new tokens")
    return c


def option_key(param: str) -> str:
    """The layout's key of the component for a method option's page parameter."""
    return f"opt:{param}"


def option_component(po: PageOption) -> gr.components.Component:
    """A method option's component, built from its declaration (sparsevlm/options.py), its value handed to the
    engine unchecked: the engine's own check names the method, the option and its range (`engine_checked`)."""
    return engine_checked(_option_component(po))


def engine_checked(comp: gr.components.Component) -> gr.components.Component:
    """The component hands its value to the handler as it came, without Gradio's own range or choice check: the
    engine checks every option (Option.check) and its message names the method, the option and the range, where
    Gradio's would name neither (an instance override, as raw_image_input)."""
    comp.preprocess = lambda payload: payload  # type: ignore[method-assign]
    return comp


def _option_component(po: PageOption) -> gr.components.Component:
    """A choice is a radio (its choice labels shown), a bool a checkbox, a number with both ends of its range a
    slider, any other number a number box; the option's help is the component's info line."""
    o: Option = po.option
    label = o.label or o.name
    common = {"label": label, "info": o.help, "elem_id": f"sv-opt-{po.param}"}
    if o.kind == "choice":
        labels = o.choice_labels if len(o.choice_labels) == len(o.choices) else o.choices
        return gr.Radio(list(zip(labels, o.choices)), value=o.default, **common)
    if o.kind == "bool":
        return gr.Checkbox(value=bool(o.default), **common)
    if o.kind == "layers":
        return gr.Textbox(value=",".join(map(str, o.default)) if o.default else "", placeholder="e.g. 2,6,15",
                          **common)
    if o.low is not None and o.high is not None:
        step = 1 if o.kind == "int" else (o.high - o.low) / SLIDER_STEPS
        return gr.Slider(o.low, o.high, value=o.default, step=step, **common)
    return gr.Number(value=o.default, precision=0 if o.kind == "int" else None, **common)


def inputs_column(first: LoadedModel, examples: list[dict], high_res: list[dict] | None = None) -> dict[str, Any]:
    c: dict[str, Any] = {}
    c["image_in"] = raw_image_input(label="Image", height=300, elem_id="sv-image", sources=["upload", "clipboard"])
    c["question_in"] = gr.Textbox(label="Question", placeholder="e.g. What colour is the circle?", lines=1,
                                  max_lines=4, elem_id="sv-question")
    c["run_btn"] = gr.Button("Run: prune and explain", variant="primary", elem_id="sv-run")
    c.update(studio_box(first))
    c["examples"] = None
    if examples:
        c["examples"] = gr.Examples([[e["image"], e["question"]] for e in examples],
                                    inputs=[c["image_in"], c["question_in"]], label="Examples - one click runs it",
                                    examples_per_page=6, elem_id="sv-examples")
    else:
        gr.Markdown("_No examples found in assets/examples/examples.json._")
    c["examples_next"] = None
    if high_res:
        c["examples_next"] = gr.Examples(
            [[e["image"], e["question"]] for e in high_res], inputs=[c["image_in"], c["question_in"]],
            label=f"High resolution (LLaVA-NeXT tiles, {len(high_res)} pictures up to 1008 px) - one click loads "
                  "scenes-llava-next and runs it", examples_per_page=7, elem_id="sv-examples-next")
    c.update(method_inputs(first))
    return c


def results_column() -> dict[str, Any]:
    c: dict[str, Any] = {}
    c["notice"] = gr.HTML("", elem_id="sv-notice")
    c["answer"] = gr.HTML("<div class='sv-help'>The answer appears here - with pruning, and from the dense model for "
                          "comparison.</div>", label="Answer", elem_id="sv-answer")
    c["overlay"] = gr.Image(label="What the decoder still sees", type="pil", format="png", elem_id="sv-overlay",
                            height=420, interactive=False, buttons=["download", "fullscreen"])
    with gr.Row():
        c["layer"] = gr.Slider(0, 1, value=0, step=1, label="Decoder layer", elem_id="sv-layer", scale=5)
        c["play_btn"] = gr.Button("▶ Play", scale=1, min_width=80, elem_id="sv-play")
    c["view_in"] = gr.Radio([("Kept / pruned / recycled tokens", "tokens"), ("Significance heatmap", "heatmap")],
                            value="tokens", show_label=False, label="View", elem_id="sv-view")
    c["caption"] = gr.Markdown(label="Layer caption", elem_id="sv-caption")
    # a method that decides attention per layer (ZipVL): the count at the slider's layer, and its probe rows
    c["mass_curve"] = gr.Plot(label="How the count p is read off at this layer (computed)", elem_id="sv-mass-curve",
                              visible=False)
    c["probes"] = gr.HTML("", label="Probe rows", elem_id="sv-probes", visible=False)
    gr.HTML(render.legend_html())
    c["patch"] = gr.HTML("<div class='sv-help'>Click a patch of the picture to follow it through every pruning "
                         "step: its score, its rank and what became of it.</div>", elem_id="sv-patch")
    return c


def explain_tabs() -> dict[str, Any]:
    """The raters, counts, latency and attention-profile tabs."""
    c: dict[str, Any] = {}
    with gr.Tab("① Text raters", id="raters"):
        gr.Markdown("Every token after the image (question + answer prompt) gets a relevance score R: how much the "
                    "visual tokens, on average, point at it. Tokens above the mean become **text raters**; only "
                    "their attention decides which visual tokens survive.", elem_classes="sv-help")
        c["raters"] = gr.HighlightedText(label="Text raters (red = rater, stronger = higher R)", show_legend=True,
                                         elem_id="sv-raters")
        c["rater_note"] = gr.Markdown(label="Rater note")
        c["token_note"] = gr.Markdown("Click a token to see its own attention over the patches at each pruning "
                                      "step.", elem_id="sv-token-note")
        c["token_views"] = gr.Gallery(label="The clicked token's attention over the patches, per pruning step "
                                      "(computed)", columns=4, height="auto", object_fit="contain",
                                      elem_id="sv-token-attention")
        c["raters_fig"] = gr.Plot(label="R per token (computed)", elem_id="sv-raters-fig")
    with gr.Tab("② Token counts", id="counts"):
        c["counts"] = gr.Plot(label="Visual tokens per layer (computed)", elem_id="sv-counts")
        c["formulas"] = gr.Markdown(label="Count rules", elem_id="sv-formulas")
        c["count_compare"] = gr.Plot(label="Adaptive and fixed counts per layer, same question (computed)",
                                     elem_id="sv-count-compare", visible=False)
    with gr.Tab("③ Latency & cost", id="latency"):
        gr.Markdown("**Measured**: wall-clock on this machine for this request. **Computed**: analytic FLOPs and "
                    "KV-cache bytes from the model shape and the token counts.", elem_classes="sv-help")
        c["latency"] = gr.HTML(label="Pruned vs dense", elem_id="sv-latency")
        c["latency_fig"] = gr.Plot(label="Latency (measured) and cost (computed)", elem_id="sv-latency-fig")
    with gr.Tab("Attention profile", id="profile"):
        gr.Markdown("FasterVLM's two measurements of where attention over the visual tokens goes, for this picture: "
                    "**shift** (does attention grow with the token index, toward the picture's lower half?) and "
                    "**dispersion** (how much of it the top 20% of the tokens hold), at a layer where a method "
                    "reads the decoder's attention, beside the vision tower's [CLS] attention. Computed from this "
                    "run's attention.", elem_classes="sv-help")
        c["profile_layer"] = gr.Dropdown([], label="Decoder layer (where a method reads the attention; the slider "
                                         "above does not move it)", elem_id="sv-profile-layer", interactive=True)
        c["profile_index"] = gr.Plot(label="Attention received against token index, with the grid's rows "
                                     "(computed)", elem_id="sv-profile-index")
        c["profile_cdf"] = gr.Plot(label="Tokens sorted by attention: cumulative share (computed)",
                                   elem_id="sv-profile-cdf")
        c["profile_text"] = gr.HTML("<div class='sv-help'>Run the model to see its attention profile.</div>",
                                    elem_id="sv-profile")
    return c


def data_tabs(first: LoadedModel | None = None) -> dict[str, Any]:
    """The compare, export and raw-trace tabs (`first`: the model the page opens with, for the compare note)."""
    c: dict[str, Any] = {}
    with gr.Tab("④ Compare methods", id="compare"):
        gr.Markdown("Same image and question, every method at the selected budget: which patches survive to the "
                    "last layer, what each answers, what it costs.", elem_classes="sv-help")
        c["compare_btn"] = gr.Button("Compare all methods", elem_id="sv-compare")
        c["compare_gallery"] = gr.Gallery(label="Last-layer tokens per method", columns=5, height="auto",
                                          elem_id="sv-compare-gallery", object_fit="contain")
        c["compare_table"] = gr.HTML(label="Per method", elem_id="sv-compare-table")
        c["compare_note"] = gr.HTML(compare_note(first) if first is not None else "",
                                    label="This model beside LLaVA-1.5", elem_id="sv-likeness")
    with gr.Tab("⑤ Export", id="export"):
        c["export_btn"] = gr.Button("Export trace JSON + pruning animation (GIF, MP4)", elem_id="sv-export")
        with gr.Row():
            c["export_files"] = gr.File(label="Downloads", file_count="multiple", elem_id="sv-export-files")
            c["export_gif"] = gr.Image(label="Pruning through the layers (GIF)", type="filepath", interactive=False,
                                       elem_id="sv-export-gif")
            c["export_mp4"] = gr.Video(label="Pruning through the layers (MP4, H.264)", interactive=False,
                                       elem_id="sv-export-mp4", loop=True)
    with gr.Tab("Raw trace", id="raw"):
        gr.Markdown("What the `/run` endpoint returns for this request: both answers and both traces (`trace` is "
                    "what `python -m sparsevlm run --trace-out` writes).", elem_classes="sv-help")
        c["record"] = gr.JSON(label="/run result", elem_id="sv-record")
        c["compare_out"] = gr.JSON(label="/compare result (after Compare all methods)", elem_id="sv-compare-json")
        c["scene_out"] = gr.JSON(label="/new_scene result: the studio scene's ground truth (evidence patches on the "
                                 "world's 24x24 grid)", elem_id="sv-scene-json")
    return c


# --- wiring --------------------------------------------------------------------------------------------------------
PAGE_INPUTS = {"image": "image_in", "question": "question_in", "method": "method_in", "budget": "budget_in",
               "accounting": "accounting_in", "max_new_tokens": "max_new_in", "view": "view_in",
               "model": "model_state", "scene": "scene_state"}


def inputs_for(c: dict[str, Any], params: list[str]) -> list[Any]:
    """The components behind a handler's parameters, in its order (a method option by its page parameter)."""
    return [c[PAGE_INPUTS[p]] if p in PAGE_INPUTS else c[option_key(p)] for p in params]


def wire_runs(h: Handlers, c: dict[str, Any]) -> None:
    """Run, the example clicks, the model picker, and the data endpoints /run and /compare."""
    run_inputs = inputs_for(c, run_params())
    explain_inputs = inputs_for(c, explain_params())
    explain_outputs = [*(c[k] for k in VIEW_NAMES), c["state"]]
    c["run_btn"].click(h.explain, explain_inputs, explain_outputs, api_name="explain", concurrency_id="model")
    c["question_in"].submit(h.explain, explain_inputs, explain_outputs, api_visibility="private",
                            concurrency_id="model")
    # An example click fills the inputs, switches the session to the model its pictures are made for (the
    # high-resolution ones: scenes-llava-next), then runs.
    switch_out = [c["model_state"], c["model_out"], c["budget_in"], c["model_in"]]
    for key, switch in (("examples", h.plain_example_model), ("examples_next", h.next_example_model)):
        if c.get(key) is None:
            continue
        event = c[key].load_input_event
        event.then(h.forget_scene, None, [c["scene_state"], c["truth_out"]], api_visibility="private", queue=False)
        switched = event.then(switch, [c["model_state"]], switch_out, api_visibility="private",
                              concurrency_id="model")
        switched.then(h.world_picker, [c["model_state"]], [c["world_in"]], api_visibility="private", queue=False)
        switched.then(h.compare_note, [c["model_state"]], [c["compare_note"]], api_visibility="private",
                      queue=False)
        switched.then(h.explain, explain_inputs, explain_outputs, api_visibility="private", concurrency_id="model")
    c["load_btn"].click(h.load_model, [c["model_in"]], [c["model_state"], c["model_out"], c["budget_in"]],
                        api_name="load_model", concurrency_id="model").success(
        h.world_picker, [c["model_state"]], [c["world_in"]], api_visibility="private", queue=False).success(
        h.compare_note, [c["model_state"]], [c["compare_note"]], api_visibility="private", queue=False)
    # The data endpoints for programs: no button on the page runs them (the page draws its views from the same
    # record via /explain), so hidden triggers carry them.
    gr.Button(visible=False).click(h.run_json, run_inputs, [c["record"]], api_name="run", concurrency_id="model")
    compare_inputs = [c[k] for k in ("image_in", "question_in", "budget_in", "max_new_in", "model_state",
                                     "scene_state")]
    gr.Button(visible=False).click(h.compare_json, compare_inputs, [c["compare_out"]], api_name="compare",
                                   concurrency_id="model")
    c["compare_btn"].click(h.compare_view, compare_inputs, [c["compare_gallery"], c["compare_table"],
                                                            c["compare_out"]],
                           api_name="compare_view", concurrency_id="model")


def wire_views(h: Handlers, c: dict[str, Any]) -> None:
    """The layer slider and its player, the studio, the word notice, and export."""
    layer_io = ([c["state"], c["layer"], c["view_in"]], [c["overlay"], c["caption"]])
    c["layer"].input(h.show_layer, *layer_io, api_name="layer_view", show_progress="hidden", concurrency_limit=4)
    c["view_in"].change(h.show_layer, *layer_io, api_visibility="private", show_progress="hidden",
                        concurrency_limit=4)
    # the attention-mass curve and probe rows follow the layer however it changes (slider, play, a new run)
    c["layer"].change(h.show_attention, [c["state"], c["layer"]], [c["mass_curve"], c["probes"]],
                      api_visibility="private", show_progress="hidden", trigger_mode="always_last",
                      concurrency_limit=4)
    # the attention profile follows each run (the tab's state changes) and its own layer picker
    profile_out = [c["profile_layer"], c["profile_index"], c["profile_cdf"], c["profile_text"]]
    c["state"].change(h.show_profile, [c["state"]], profile_out, api_visibility="private", show_progress="hidden",
                      concurrency_limit=4)
    c["profile_layer"].input(h.show_profile, [c["state"], c["profile_layer"]], profile_out,
                             api_visibility="private", show_progress="hidden", concurrency_limit=4)
    groups = c["option_groups"]
    c["method_in"].change(lambda m: [gr.Accordion(visible=m == g) for g in groups], [c["method_in"]],
                          list(groups.values()), api_visibility="private", queue=False, show_progress="hidden")
    c["raters"].select(h.token_view, [c["state"]], [c["token_note"], c["token_views"]], api_visibility="private",
                       concurrency_limit=4)
    c["overlay"].select(h.patch_info, [c["state"]], [c["patch"]], api_visibility="private", concurrency_limit=4)
    timer = gr.Timer(0.8, active=False)
    c["play_btn"].click(lambda: (gr.Timer(active=True), 0), None, [timer, c["layer"]], api_visibility="private",
                        queue=False).then(h.show_layer, *layer_io, api_visibility="private", show_progress="hidden")
    timer.tick(h.step_layer, layer_io[0], [timer, c["layer"], c["overlay"], c["caption"]],
               api_visibility="private", show_progress="hidden", concurrency_limit=4)
    c["scene_btn"].click(h.new_scene, [c["seed_in"], c["family_in"], c["world_in"], c["model_state"]],
                         [c["image_in"], c["question_in"], c["scene_out"], c["seed_in"], c["scene_state"],
                          c["truth_out"]], api_name="new_scene", concurrency_limit=4)
    forget = (h.forget_scene, None, [c["scene_state"], c["truth_out"]])
    c["image_in"].upload(*forget, api_visibility="private", queue=False)
    c["question_in"].input(*forget, api_visibility="private", queue=False)
    c["question_in"].change(h.word_notice, [c["question_in"], c["model_state"]], [c["notice"]],
                            api_visibility="private", show_progress="hidden", trigger_mode="always_last",
                            concurrency_limit=4)
    c["export_btn"].click(h.export, [c["state"]], [c["export_files"], c["export_gif"], c["export_mp4"]],
                          api_name="export", concurrency_limit=2)


def build_app(models: ModelCache, default_model: str, examples: list[dict] | None = None,
              high_res: list[dict] | None = None) -> gr.Blocks:
    """The whole page. `models` holds the loaded models; each browser session picks one (default_model first).
    `high_res`: the high-resolution examples (default: assets/examples-next when scenes-llava-next is installed
    and offered)."""
    examples = load_examples() if examples is None else examples
    high_res = next_examples(models) if high_res is None else high_res
    h = Handlers(models, default_model, examples, high_res)
    first, _ = models.get(default_model)
    with gr.Blocks(title="SparseVLM Explorer") as demo:
        c: dict[str, Any] = {"state": gr.State(None),  # the session after a run (handlers.Session: plain data)
                             "model_state": gr.State(default_model),  # the session's model (a key of `models`)
                             "scene_state": gr.State(None)}  # the studio scene's truth while the inputs show it
        gr.HTML(INTRO)
        c.update(model_bar(h, first))
        with gr.Row(equal_height=False):
            with gr.Column(scale=4, min_width=320):
                c.update(inputs_column(first, examples, high_res))
            with gr.Column(scale=6, min_width=420):
                c.update(results_column())
        with gr.Tabs():
            c.update(explain_tabs())
            c.update(data_tabs(first))
        wire_runs(h, c)
        wire_views(h, c)
    return demo


def launch_kwargs() -> dict:
    return {"css": CSS, "theme": gr.themes.Soft(primary_hue="indigo", neutral_hue="slate")}
