"""One call: image + question -> processor -> generate under a prune config -> (answer, trace)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch
from PIL import Image

from . import cost as C
from . import layout as LY
from . import profile as P
from .config import PruneConfig
from .errors import ConfigError, InputError
from .hooks import CallRecord, PruneHooks, SharedWork, cls_attention, encode_image
from .loading import LoadedModel
from .methods import get_method
from .schedule import BUDGET_TOLERANCE, budget_figure, equal_tokens, equal_tokens_reference
from .tokenizer import prompt_for
from .trace import Cost, Memory, PruneTrace, Rater, Timings

MAX_QUESTION_CHARS = 2000


@dataclass
class RunResult:
    answer: str
    trace: PruneTrace
    shared_keys: list = field(default_factory=list)  # request-level work this run read (hooks.SharedWork keys)


def kv_cache_bytes(cache) -> tuple[int, list[int]]:
    """Bytes held by a transformers Cache's key/value tensors, and the cached positions of each layer."""
    total, per_layer = 0, []
    for layer in getattr(cache, "layers", []):
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if keys is None or values is None:
            per_layer.append(0)
            continue
        total += keys.numel() * keys.element_size() + values.numel() * values.element_size()
        per_layer.append(int(keys.shape[-2]) if keys.dim() >= 2 and keys.numel() else 0)
    return int(total), per_layer


class _CacheProbe:
    """A forward hook on the model that reads the KV cache object after every forward: the first reading is the
    prefill's cache, the last one the cache generate() ends with."""

    def __init__(self):
        self.readings: list[tuple[int, list[int]]] = []

    def __call__(self, module, args, output):
        cache = getattr(output, "past_key_values", None)
        if cache is not None:
            self.readings.append(kv_cache_bytes(cache))


def build_prompt(processor, question: str) -> str:
    """The model's own chat template when it has one, else the LLaVA-1.5 format."""
    if getattr(processor, "chat_template", None):
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(conversation, add_generation_prompt=True)
    return prompt_for(question)


def input_region(image_processor, width: int, height: int, covered: float = 1.0) -> tuple[float, float, float, float]:
    """The box of the original image (its pixels; may extend past the edges when padding) that the image
    processor turns into the model's square input: resize-shortest-edge + center-crop, plain resize, or pad.

    covered: the share of the square input the patch grid tiles (grid * patch / image size). SigLIP-384 with
    14-pixel patches tiles 27 * 14 = 378 of 384 pixels; its last 6 rows and columns reach no patch."""
    size = getattr(image_processor, "size", None) or {}
    if getattr(image_processor, "do_pad", False):  # LLaVA's expand-to-square, then resize
        side = max(width, height)
        x0, y0 = (width - side) / 2, (height - side) / 2
        x1, y1 = x0 + side, y0 + side
    elif getattr(image_processor, "do_center_crop", False) and "shortest_edge" in size:
        crop = image_processor.crop_size
        scale = size["shortest_edge"] / min(width, height)
        rw, rh = width * scale, height * scale
        cw, ch = min(crop["width"], rw), min(crop["height"], rh)
        x0, y0 = (rw - cw) / 2 / scale, (rh - ch) / 2 / scale
        x1, y1 = x0 + cw / scale, y0 + ch / scale
    else:
        x0, y0, x1, y1 = 0.0, 0.0, float(width), float(height)
    return (x0, y0, x0 + (x1 - x0) * covered, y0 + (y1 - y0) * covered)


def _grid_coverage(lm: LoadedModel) -> float:
    v = lm.model.config.vision_config
    return (v.image_size // v.patch_size) * v.patch_size / v.image_size


def check_question(question: str) -> str:
    if not isinstance(question, str) or not question.strip():
        raise InputError("the question is empty: type a question about the image")
    question = " ".join(question.split())
    if len(question) > MAX_QUESTION_CHARS:
        raise InputError(f"the question is {len(question)} characters long; the limit is {MAX_QUESTION_CHARS}")
    return question


def layout_for(lm: LoadedModel, image_size: tuple[int, int]) -> LY.VisualLayout:
    """The visual layout of one upload on this model: LLaVA-1.5's one grid over the processor's input region, or
    LLaVA-NeXT's base view, tiles and newline tokens for the picture's size."""
    if lm.anyres:
        return LY.for_model(lm.model.config, image_size)
    return LY.single(lm.grid, input_region(lm.processor.image_processor, *image_size, covered=_grid_coverage(lm)),
                     image_size)


@dataclass
class Prepared:
    """One request's inputs, made once: the checked question, the processor's tensors and the encoded image
    (vision tower + projector, `hooks.SharedWork`). Every run of the request starts from it."""

    question: str
    prompt: str
    inputs: dict  # the processor's tensors except pixel_values (input_ids, attention_mask, ...)
    n_prompt: int
    image_size: tuple[int, int]
    work: SharedWork
    layout: LY.VisualLayout | None = None  # where each visual token comes from (views, newline tokens)


def _check_request(question: str, max_new_tokens: int) -> str:
    question = check_question(question)
    if not 1 <= int(max_new_tokens) <= 512:
        raise InputError("max new tokens must lie between 1 and 512")
    return question


def prepare(lm: LoadedModel, image: Image.Image, question: str, max_new_tokens: int = 16) -> Prepared:
    """Check the question, run the processor and encode the image once (timed: `SharedWork.vision_ms`)."""
    question = _check_request(question, max_new_tokens)
    prompt = build_prompt(lm.processor, question)
    inputs = lm.processor(images=image, text=prompt, return_tensors="pt").to(lm.device)
    pixel_values = inputs.pop("pixel_values").to(lm.dtype)
    layout = layout_for(lm, tuple(image.size))
    n_prompt = inputs["input_ids"].shape[1]
    if n_prompt + max_new_tokens > lm.context_length:
        what = "shorten the question" if not lm.anyres else \
            "use a smaller picture (fewer tiles) or shorten the question"
        raise InputError(
            f"the prompt is {n_prompt} tokens (image {layout.total} + question) and {max_new_tokens} new tokens "
            f"would not fit the model's context of {lm.context_length}: {what}"
        )
    with torch.inference_mode():
        work = encode_image(lm.model, pixel_values, inputs.get("image_sizes"))
    return Prepared(question, prompt, dict(inputs), n_prompt, tuple(image.size), work, layout)


@dataclass(frozen=True)
class Decoding:
    """How a run generates: greedy by default, or sampling with temperature and top_p from `seed`."""

    max_new_tokens: int = 16
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


def run(
    lm: LoadedModel,
    image: Image.Image,
    question: str,
    config: PruneConfig,
    max_new_tokens: int = 16,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> RunResult:
    """Answer `question` about `image` with `config`'s pruning installed; the trace records every decision."""
    _check_request(question, max_new_tokens)
    _check_config(lm, config)  # an unknown method and a bad config are reported before any model work
    prepared = prepare(lm, image, question, max_new_tokens)
    return run_prepared(lm, prepared, config, Decoding(max_new_tokens, do_sample, temperature, top_p, seed))


def _check_config(lm: LoadedModel, config: PruneConfig) -> None:
    get_method(config.method)
    config.validate(lm.visual_tokens)


def run_shared(lm: LoadedModel, image: Image.Image, question: str, configs: list[PruneConfig],
               decoding: Decoding | None = None, raise_errors: bool = False) -> list[RunResult | ConfigError]:
    """Several configs on one image and question, as one request: the processor, the vision tower + projector and
    the text raters (where methods use the same rule) run once and are shared, so each decision is exactly what
    `run` gives alone. Per config: its result, or the ConfigError saying why it cannot run on this model (e.g.
    [CLS] attention on a tower without [CLS]); raise_errors: raise it instead, before the configs after it run.
    The shared parts are named in each trace's `timings_ms.shared`.
    """
    decoding = decoding or Decoding()
    prepared = prepare(lm, image, question, decoding.max_new_tokens)
    out: list[RunResult | ConfigError] = []
    for config in configs:
        try:
            _check_config(lm, config)
            out.append(run_prepared(lm, prepared, config, decoding))
        except ConfigError as exc:
            if raise_errors:
                raise
            out.append(exc)
    ran = [r for r in out if isinstance(r, RunResult)]
    for r in ran:
        shared = ["vision"] if len(ran) > 1 else []
        if r.trace.raters and any(prepared.work.uses.get(k, 0) > 1 for k in r.shared_keys):
            shared.append("raters")
        r.trace.timings_ms.shared = shared
    return out


def run_prepared(lm: LoadedModel, prepared: Prepared, config: PruneConfig,
                 decoding: Decoding | None = None) -> RunResult:
    """One run from a request's prepared inputs (`prepare`): generate with the encoded image handed over."""
    d = decoding or Decoding()
    layout = prepared.layout or layout_for(lm, prepared.image_size)
    config.validate(layout.total)
    gen = {"max_new_tokens": int(d.max_new_tokens), "do_sample": bool(d.do_sample)}
    if d.do_sample:
        gen.update(temperature=float(d.temperature), top_p=float(d.top_p))
        torch.manual_seed(d.seed)
    work = prepared.work
    fitted = None
    fit = get_method(config.method).budget_fit(config)
    if fit is not None:
        config, fitted = fit_option(lm, prepared, config, fit)
    hooks = PruneHooks(lm.model, config, layout=layout).share(work)
    probe = _CacheProbe()
    on_cuda = lm.device.type == "cuda"
    handle = lm.model.register_forward_hook(probe)
    try:
        with torch.inference_mode(), hooks:
            if on_cuda:
                torch.cuda.synchronize(lm.device)
                torch.cuda.reset_peak_memory_stats(lm.device)
            t0 = time.perf_counter()
            out = lm.model.generate(**prepared.inputs, mm_encoder_outputs={"image": work.image}, **gen)
            if on_cuda:
                torch.cuda.synchronize(lm.device)
            # The image was encoded before generate (as generate itself does first): its time belongs to the call.
            total_ms = work.vision_ms + (time.perf_counter() - t0) * 1e3
    finally:
        handle.remove()
    n_prompt = prepared.n_prompt
    new_ids = out[0, n_prompt:]
    answer = lm.processor.decode(new_ids, skip_special_tokens=True).strip()
    memory = Memory(
        kv_bytes_prefill=probe.readings[0][0] if probe.readings else None,
        kv_bytes_final=probe.readings[-1][0] if probe.readings else None,
        kv_tokens_per_layer=probe.readings[0][1] if probe.readings else [],
        peak_gpu_bytes=int(torch.cuda.max_memory_allocated(lm.device)) if on_cuda else None,
        peak_gpu_note="" if on_cuda else f"n/a: the model runs on {lm.device.type}, not a CUDA GPU",
    )
    record = hooks.record()
    trace = build_trace(lm, record, config, prepared.question, prepared.prompt, prepared.inputs["input_ids"][0],
                        prepared.image_size, answer, len(new_ids), total_ms, memory, layout)
    trace.attention_profile = attention_profile(lm, work, record, layout)
    if fitted is not None:
        _fitted_budget(trace, config, fitted, C.DecoderShape.from_config(lm.model.config), lm.num_layers)
    return RunResult(answer, trace, record.shared_keys)


def attention_profile(lm: LoadedModel, work: SharedWork, record: CallRecord,
                      layout: LY.VisualLayout | None = None) -> dict:
    """The trace's attention profile: [CLS] from the request's one image encoding (LLaVA-NeXT: the base view's
    [CLS] over the base view's patches), the decoder's from the run."""
    rows, cols = lm.grid
    cls = cls_attention(lm.model, work.vision)
    if cls is None:
        return {"cls": None, "decoder": list(record.profile)}
    base = layout.views[0] if layout is not None else None
    if base is None or layout.single:
        entry = P.entry(cls.float().tolist(), list(range(len(cls))), len(cls), rows, cols)
    else:  # the base view's cells are the first tokens; the lower half as the layout places them
        entry = P.entry(cls.float().tolist(), list(base.tokens), len(base.tokens), lower=layout.lower_weights())
    return {"cls": entry, "decoder": list(record.profile)}


FIT_PASSES = 14  # bisection steps on tau (each one prefill pass)


def _attention_figure(lm: LoadedModel, record: CallRecord, config: PruneConfig) -> float:
    """What a fitted budget is compared with: the mean attended visual tokens per layer (paper accounting), or
    the prefill FLOPs (flops accounting), of one prefill's attention decisions."""
    if config.accounting == "paper":
        return sum(a.visual for a in record.attention) / max(1, len(record.attention))
    return call_cost(lm, record, config).prefill_flops


def fit_option(lm: LoadedModel, prepared: Prepared, config: PruneConfig, name: str) -> tuple[PruneConfig, dict]:
    """A method's option (ZipVL's tau) fitted to the budget for this input: bisection on it over (0, 1] by prefill
    passes, so that the mean attended visual tokens per layer (paper accounting) or the prefill FLOPs (flops
    accounting, the FLOPs of `budget` visual tokens in every layer) come nearest the budget. A flops budget below
    what the projections and MLP cost on every token is a ConfigError: such a method never removes a token from
    them."""
    shape = C.DecoderShape.from_config(lm.model.config)
    n = prepared.n_prompt
    fixed = n - lm.visual_tokens
    depth = lm.num_layers
    if config.accounting == "flops":
        target = C.prefill_flops([fixed + config.budget] * depth, shape)
        floor = depth * (C.linear_flops(n, shape) + C.layer_flops(1, shape, 1) - C.linear_flops(1, shape))
        if floor > target:
            raise ConfigError(
                f"ZipVL cannot meet a flops budget of {config.budget} tokens: its projections and MLP run on all {n} "
                f"tokens at every layer ({floor / 1e9:.2f} GFLOPs with a single token attending) and exceed the "
                f"{target / 1e9:.2f} GFLOPs of {config.budget} visual tokens in every layer")
    else:
        target = float(config.budget)

    def at(value: float) -> PruneConfig:
        return replace(config, options={**config.options, name: value})

    def figure_at(value: float) -> float:
        cfg = at(value)
        hooks = PruneHooks(lm.model, cfg).share(prepared.work)
        with torch.inference_mode(), hooks:
            lm.model(**prepared.inputs, mm_encoder_outputs={"image": prepared.work.image}, use_cache=False)
        return _attention_figure(lm, hooks.record(), cfg)

    lo, hi = 1e-4, 1.0
    best = (float("inf"), 1.0, figure_at(1.0))
    if best[2] <= target:  # even tau = 1 stays within the budget
        best = (abs(best[2] - target), 1.0, best[2])
    else:
        for _ in range(FIT_PASSES - 1):
            mid = (lo + hi) / 2
            f = figure_at(mid)
            if abs(f - target) < best[0]:
                best = (abs(f - target), mid, f)
            lo, hi = (mid, hi) if f < target else (lo, mid)
    return at(best[1]).validate(lm.visual_tokens), {"tau": best[1], "target": target, "passes": FIT_PASSES}


def equivalent_tokens(flops: float, fixed: int, depth: int, shape: C.DecoderShape) -> float:
    """The visual-token count v whose dense prefill (v visual tokens in every layer) costs `flops`."""
    lo, hi = 0.0, 1e7
    for _ in range(100):
        mid = (lo + hi) / 2
        if depth * C.layer_flops(fixed + mid, shape) < flops:  # type: ignore[arg-type]
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _fitted_budget(trace: PruneTrace, config: PruneConfig, fitted: dict, shape: C.DecoderShape, depth: int) -> None:
    """The budget claim of ZipVL's rule with tau fitted to the budget, in the accounting's own figure."""
    c = trace.cost
    c.budget, c.budget_note = config.budget, ""
    if config.accounting == "paper":
        c.budget_counting, c.budget_figure = "attended", c.attended_visual
        c.budget_met = c.attended_visual is not None and abs(c.attended_visual - config.budget) <= BUDGET_TOLERANCE
    else:
        c.budget_counting = "flops"
        c.budget_figure = equivalent_tokens(c.prefill_flops, trace.prefix_tokens + trace.text_tokens, depth, shape)
        c.budget_met = abs(c.budget_figure - config.budget) <= BUDGET_TOLERANCE
    trace.notes.insert(0, f"ZipVL's rule, τ fitted to the budget: τ = {fitted['tau']:.4f} found by bisection over "
                          f"{fitted['passes']} prefill passes (not part of this run's measured latency), so that "
                          + ("the mean attended visual tokens per layer" if config.accounting == "paper" else
                             "the prefill FLOPs") + f" come nearest {config.budget} tokens' worth; not the paper's "
                          "setting (the paper runs at a fixed τ)")


def budget_figures(record: CallRecord, config: PruneConfig) -> dict:
    """Both equal-token figures of a call (from its measured layer counts) and the one its accounting meets."""
    visual = list(record.layer_inputs) or [record.visual_total]
    depth = len(visual)
    after = [s for s in record.stages if s.after_layer >= 0]
    fin = equal_tokens(visual)
    fout = equal_tokens_reference(visual[0], tuple(s.after_layer for s in after), [s.visual_out for s in after],
                                  depth) if after else fin
    out = {"equal_tokens": fin, "equal_tokens_reference": fout, "accounting": config.accounting, "budget": None,
           "budget_counting": "", "budget_figure": None, "budget_met": None}
    if record.counts is not None:
        counting = record.counts.budget_counting
        kept = float(record.stages[-1].visual_out) if record.stages else float(visual[-1])
        figure = budget_figure(counting, fin, fout, kept, record.counts.kept_extra)
        out.update(budget=config.budget, budget_counting=counting, budget_figure=figure,
                   budget_met=abs(figure - config.budget) <= BUDGET_TOLERANCE)
    return out


def call_cost(lm, record: CallRecord, config: PruneConfig) -> Cost:
    """The computed cost of one call (cost.py's formulas over its layer counts and attention decisions)."""
    st = record
    layers = record.layer_records()
    shape = C.DecoderShape.from_config(lm.model.config)
    fixed = st.prefix + st.text
    per_layer = [fixed + r.visual_in for r in layers]
    dense = [fixed + st.visual_total] * len(layers)
    bpv = C.bytes_per_value(str(lm.dtype))
    overhead = C.rater_flops(st.text, st.visual_total, shape) if st.relevance is not None else 0.0
    for s in st.stages:
        overhead += C.stage_overhead_flops(s.raters, fixed + s.visual_in, s.visual_in, s.recycled, s.clusters, shape)
    visual_per_layer = [r.visual_in for r in layers]
    # Where the method decided attention (ZipVL): attention among the attended tokens only, the probe rows' cost,
    # and a cache that holds the attended tokens.
    attended: list[int | None] = [None] * len(layers)
    cached, cached_visual = list(per_layer), list(visual_per_layer)
    for a in record.attention:
        attended[a.layer] = cached[a.layer] = len(a.attended)
        cached_visual[a.layer] = a.visual
        rows = a.n if a.extras.get("probes") == "all" else len(a.extras.get("probes", []))
        rows += a.n if "full" in a.extras else 0
        overhead += C.probe_flops(rows, a.n, shape)
    cost = Cost(
        **budget_figures(record, config),
        prefill_flops_dense=C.prefill_flops(dense, shape),
        prefill_flops=C.prefill_flops(per_layer, shape, attended) + overhead,
        prune_overhead_flops=overhead,
        kv_bytes_dense=C.kv_bytes(dense, shape, bpv),
        kv_bytes=C.kv_bytes(cached, shape, bpv),
        visual_kv_bytes_dense=C.kv_bytes([st.visual_total] * len(layers), shape, bpv),
        visual_kv_bytes=C.kv_bytes(cached_visual, shape, bpv),
        bytes_per_value=bpv,
    )
    if record.attention:
        cost.attended_share = sum(len(a.attended) / a.n for a in record.attention) / len(record.attention)
        cost.attended_visual = sum(a.visual for a in record.attention) / len(record.attention)
        if cost.budget is None:
            cost.budget_note = (f"no budget: τ = {record.attention[0].extras.get('tau', 0):g} sets each layer's "
                                f"count; {cost.attended_visual:.1f} of {st.visual_total} visual tokens attended per "
                                "layer on average")
    return cost


def build_trace(lm, record: CallRecord, config, question, prompt, input_ids, image_size, answer, n_new, total_ms,
                memory: Memory | None = None, layout: LY.VisualLayout | None = None):
    st = record
    text_ids = input_ids[st.prefix + st.visual_total :].tolist()
    tokens = lm.processor.tokenizer.convert_ids_to_tokens(text_ids)
    raters: list[Rater] = []
    if st.relevance is not None:
        chosen = set(st.raters or [])
        raters = [Rater(i, tok, float(r), i in chosen) for i, (tok, r) in enumerate(zip(tokens, st.relevance))]
    layers = record.layer_records()
    cost = call_cost(lm, record, config)
    fwd = st.forward_ms
    prefill = (fwd[0] if fwd else 0.0) + (0.0 if st.vision_in_forward else st.vision_ms)
    decode = fwd[1:]
    timings = Timings(
        vision=st.vision_ms,
        raters=st.raters_ms,
        prune_overhead=st.raters_ms + sum(s.overhead_ms for s in st.stages) + sum(a.overhead_ms for a in
                                                                                  record.attention),
        prefill=prefill,
        llm_prefill=(fwd[0] if fwd else 0.0) - (st.vision_ms if st.vision_in_forward else 0.0),
        decode_per_token=sum(decode) / len(decode) if decode else 0.0,
        decode_tokens=len(decode),
        total=total_ms,
    )
    layout = layout or layout_for(lm, tuple(image_size))
    base = layout.views[0]
    rows, cols = base.grid
    notes = []
    if record.note:
        notes.append(record.note)
    notes.append("equal tokens: mean over decoder layers of the visual tokens each layer processes, counted at each "
                 "layer's input (equal_tokens; what FLOPs follow) and with a pruning layer counted at its output "
                 "(equal_tokens_reference; the reference code's figure)")
    if cost.budget_met is False:
        notes.append(f"budget {config.budget} not met: {cost.budget_counting}-counted figure "
                     f"{cost.budget_figure:.1f}")
    return PruneTrace(
        method=config.method,
        config={**config.to_dict(), "positions": record.positions},  # the positions mode that ran
        model=lm.describe(),
        question=question,
        prompt=prompt,
        answer=answer,
        image_size=tuple(image_size),
        input_region=tuple(base.box),  # the first (LLaVA-1.5: only) view's; `layout` has every view
        grid=(rows, cols),
        layout=layout.to_dict(),
        prefix_tokens=st.prefix,
        visual_tokens=st.visual_total,
        text_tokens=st.text,
        generated_tokens=n_new,
        raters=raters,
        stages=st.stages,
        layers=layers,
        timings_ms=timings,
        cost=cost,
        notes=notes,
        memory=memory or Memory(),
        attention=list(record.attention),
    )
