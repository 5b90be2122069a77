"""The pruning benchmark on generated scenes: accuracy and evidence recall of every method at equal budgets.

Because the scenes are generated, every question knows its evidence patches (the grid cells covered by the
objects its answer depends on), so besides accuracy (the paper's Table 1 format, retained vs dense) we measure
whether a method keeps the right patches: evidence recall = the fraction of evidence patches still represented
(kept, or a member of a recycled cluster) - after the last pruning stage, and averaged over decoder layers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ACCOUNTINGS, PruneConfig
from .hooks import CallRecord, PruneHooks
from .loading import DEFAULT_MODEL, LoadedModel, load_model
from .methods import METHODS, get_method
from .options import setting_label
from .pipeline import budget_figures, build_prompt, call_cost
from .trace import PruneTrace, Stage

BUDGETS = (192, 128, 96, 64)


@dataclass(frozen=True)
class Setting:
    label: str
    method: str
    config: PruneConfig


def settings(accountings: tuple[str, ...] = ACCOUNTINGS) -> list[Setting]:
    """Dense, then every registered method at every budget in each accounting, then SparseVLM's adaptive modes."""
    out = [Setting("dense", "dense", PruneConfig(method="dense"))]
    for accounting in accountings:
        for method in METHODS:
            if method == "dense" or not get_method(method).budgeted:
                continue
            for b in BUDGETS:
                out.append(Setting(f"{method}-{b}-{accounting}", method,
                                   PruneConfig(method=method, budget=b, accounting=accounting)))
    for method in METHODS:  # methods whose own rule sets the counts: at their benchmark settings, no budget
        for opts in get_method(method).benchmark_options:
            out.append(Setting(setting_label(method, opts), method, PruneConfig(method=method, options=dict(opts))))
    out.append(Setting("sparsevlm-paper-l1", "sparsevlm", PruneConfig(method="sparsevlm", count_mode="paper", lam=1.0)))
    out.append(Setting("sparsevlm-code-9/6", "sparsevlm",
                       PruneConfig(method="sparsevlm", count_mode="code", scale=9, bias=6)))
    return out


def _depth(run: PruneTrace | CallRecord) -> int:
    layers = getattr(run, "layers", None)
    if layers:
        return len(layers)
    model = getattr(run, "model", None) or {}
    return int(model.get("decoder_layers", model.get("num_layers", 1)))


def _seen_by(stages: Sequence[Stage], layer: int) -> Stage | None:
    """The last stage whose result decoder layer `layer` sees (None: nothing pruned before it)."""
    last = None
    for st in stages:
        if st.after_layer < layer:
            last = st
    return last


def evidence_recall(run: PruneTrace | CallRecord, evidence: Sequence[int] | None,
                    depth: int | None = None) -> dict | None:
    """How much of the evidence (patch indices the answer depends on) the decoder still sees, from a run's stages
    (a PruneTrace or a hooks CallRecord; `depth` = decoder layers, read from a trace when left out).

    Shares of the evidence patches at the last decoder layer: kept directly, only inside a recycled / merged
    token, represented either way (Stage.represented); and represented averaged over every decoder layer (a
    method may keep the evidence until late). None without evidence (uploads, or a sample whose answer rests on
    no patch, e.g. "how many ... ?" -> zero)."""
    ev = set(int(p) for p in evidence or ())
    if not ev:
        return None
    depth = _depth(run) if depth is None else depth
    n = len(ev)

    def seen(st: Stage | None) -> tuple[int, int]:
        """(evidence patches kept directly, represented) after stage `st`."""
        if st is None:  # nothing pruned before this layer: every patch is still there
            return n, n
        return len(ev & set(st.kept)), len(ev & st.represented())

    kept, represented = seen(_seen_by(run.stages, depth - 1))
    layers = [seen(_seen_by(run.stages, layer))[1] / n for layer in range(depth)]
    out = {"evidence_patches": n, "kept": kept / n, "merged_only": (represented - kept) / n,
           "represented": represented / n, "represented_mean_over_layers": sum(layers) / len(layers)}
    attention = getattr(run, "attention", None) or []
    if attention:  # a method that decides attention keeps every token; what counts is who attended
        prefix = run.prefix if hasattr(run, "prefix") else run.prefix_tokens
        shares = [len(ev & {p - prefix for p in a.attended}) / n for a in attention]
        out["attended_mean_over_layers"] = sum(shares) / len(shares)
    return out


def evidence_recall_per_stage(run: PruneTrace | CallRecord, evidence: Sequence[int] | None) -> list[dict]:
    """The same shares after every pruning step (what the layers after `after_layer` see): a method may drop the
    evidence late, after the text has already read it."""
    ev = set(int(p) for p in evidence or ())
    if not ev:
        return []
    n = len(ev)
    return [{"after_layer": st.after_layer, "kept": len(ev & set(st.kept)) / n,
             "represented": len(ev & st.represented()) / n} for st in run.stages]


@torch.inference_mode()
def evaluate(lm: LoadedModel, n: int, seed: int, labels: list[str] | None = None, log=print,
             accountings: tuple[str, ...] = ACCOUNTINGS, world: str | None = None) -> dict:
    """`world`: whose scenes (default: the model's own, read from its folder's training_state.json, so the benchmark
    asks each embedded model what it was trained to answer; the embedded model's world for a model that records
    none, such as a hub checkpoint, and the log says so)."""
    from .scenes.world import FAMILIES
    from .scenes.worlds import DEFAULT_WORLD, check_world, heldout_item, world_of_model

    if world is None:
        world = world_of_model(getattr(lm.model, "name_or_path", None) or None)
        if world is None:
            world = DEFAULT_WORLD
            if log:
                log(f"{lm.name} records no world of its own: asking questions of the embedded model's world "
                    f"({world})")
    world = check_world(world)

    chosen = [s for s in settings(accountings) if labels is None or s.label in labels]
    budgeted = {s.label: s.method != "dense" and get_method(s.method).budgeted for s in chosen}
    per = {s.label: {"method": s.method, "accounting": s.config.accounting if budgeted[s.label] else None,
                     "budget": s.config.budget if budgeted[s.label] else None,
                     "options": s.config.resolved_options(), "flops_ratio": [], "kv_ratio": [],
                     "attended_share": [], "attended_visual": [], "recall_attended": [],
                     "correct": {f: 0 for f in FAMILIES}, "total": {f: 0 for f in FAMILIES}, "recall_last": [],
                     "recall_direct": [], "recall_layers": [], "equal_tokens": [], "equal_tokens_output": [],
                     "hits": [], "errors": 0} for s in chosen}
    hooks = {}
    for s in chosen:
        try:
            hooks[s.label] = PruneHooks(lm.model, s.config)
        except ValueError as e:  # a budget this model cannot reach, FasterVLM without [CLS]: reported, not hidden
            per[s.label]["unavailable"] = str(e)
    depth = lm.num_layers
    t0 = time.time()
    for i in range(n):
        item = heldout_item(i, seed, world)
        image, sample = item.image, item.sample
        inputs = lm.processor(images=image, text=build_prompt(lm.processor, sample.question), return_tensors="pt")
        inputs = inputs.to(lm.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(lm.dtype)
        n_prompt = inputs["input_ids"].shape[1]
        for s in chosen:
            h = hooks.get(s.label)
            if h is None:
                continue
            rec = per[s.label]
            with h:
                out = lm.model.generate(**inputs, max_new_tokens=3, do_sample=False)
            pred = lm.processor.decode(out[0, n_prompt:], skip_special_tokens=True).strip().lower()
            rec["total"][sample.family] += 1
            rec["correct"][sample.family] += int(pred == sample.answer.lower())
            rec["hits"].append(int(pred == sample.answer.lower()))
            record = h.record()
            recall = evidence_recall(record, sample.evidence, depth)
            if recall is not None:
                rec["recall_last"].append(recall["represented"])
                rec["recall_direct"].append(recall["kept"])
                rec["recall_layers"].append(recall["represented_mean_over_layers"])
                if "attended_mean_over_layers" in recall:
                    rec["recall_attended"].append(recall["attended_mean_over_layers"])
            figures = budget_figures(record, s.config)
            cost = call_cost(lm, record, s.config)
            rec["flops_ratio"].append(cost.prefill_flops / cost.prefill_flops_dense)
            rec["kv_ratio"].append(cost.kv_bytes / cost.kv_bytes_dense)
            if cost.attended_share is not None:
                rec["attended_share"].append(cost.attended_share)
                rec["attended_visual"].append(cost.attended_visual)
            rec["equal_tokens"].append(figures["equal_tokens"])
            rec["equal_tokens_output"].append(figures["equal_tokens_reference"])
        if log and (i + 1) % max(1, n // 10) == 0:
            log(f"  {i + 1}/{n} questions, {time.time() - t0:.0f} s")
    return {**summarize(per, lm, n, seed, time.time() - t0), "world": world}


Z95 = 1.96  # a 95% interval is 1.96 standard errors either side


def half_width(hits: Sequence[int]) -> float | None:
    """95% interval half-width of an accuracy over `hits` (0/1 per question; normal approximation, questions as
    the sampling unit)."""
    n = len(hits)
    if n < 2:
        return None
    p = sum(hits) / n
    return Z95 * (p * (1 - p) / n) ** 0.5


def paired_difference(a: Sequence[int], b: Sequence[int]) -> tuple[float, float] | None:
    """Accuracy of `a` minus `b` on the same questions, with its 95% half-width from the per-question differences
    (paired: both answered every question, so the question-to-question variation cancels)."""
    n = len(a)
    if n < 2 or len(b) != n:
        return None
    d = [x - y for x, y in zip(a, b, strict=True)]
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1)
    return mean, Z95 * (var / n) ** 0.5


def ordering(result: dict, budget: int, accounting: str) -> list[dict]:
    """The fixed-budget settings at `budget` tokens in one accounting, best first, each with its accuracy, 95%
    half-width and, against the next one down, the paired difference and whether it is outside the noise."""
    rows = [r for r in result["rows"] if "accuracy" in r and r.get("budget") == budget
            and r.get("accounting") == accounting and r["setting"] == f"{r['method']}-{budget}-{accounting}"]
    rows.sort(key=lambda r: -r["accuracy"])
    out = []
    for k, r in enumerate(rows):
        item = {"setting": r["setting"], "method": r["method"], "accuracy": r["accuracy"],
                "half_width": r.get("accuracy_half_width"), "retained": r.get("retained")}
        if k + 1 < len(rows) and r.get("hits") and rows[k + 1].get("hits"):
            diff = paired_difference(r["hits"], rows[k + 1]["hits"])
            if diff is not None:
                item["vs_next"] = {"setting": rows[k + 1]["setting"], "difference": diff[0], "half_width": diff[1],
                                   "outside_noise": abs(diff[0]) > diff[1]}
        out.append(item)
    return out


def summarize(per: dict, lm: LoadedModel, n: int, seed: int, seconds: float) -> dict:
    rows = []
    dense_acc = None
    dense_hits = per.get("dense", {}).get("hits")
    for label, rec in per.items():
        if "unavailable" in rec:
            rows.append({"setting": label, "unavailable": rec["unavailable"]})
            continue
        total = sum(rec["total"].values())
        acc = sum(rec["correct"].values()) / max(total, 1)
        if label == "dense":
            dense_acc = acc
        fam = {f: rec["correct"][f] / rec["total"][f] for f in rec["total"] if rec["total"][f]}
        mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
        rows.append({
            "setting": label,
            "method": rec["method"],
            "accounting": rec["accounting"],
            "budget": rec["budget"],
            "equal_tokens": mean(rec["equal_tokens"]),
            "equal_tokens_output": mean(rec["equal_tokens_output"]),
            "flops_ratio": mean(rec["flops_ratio"]),
            "kv_ratio": mean(rec["kv_ratio"]),
            "attended_share": mean(rec["attended_share"]),
            "attended_visual": mean(rec["attended_visual"]),
            "options": rec["options"],
            "accuracy": acc,
            "per_family": fam,
            "evidence_recall_last": mean(rec["recall_last"]),
            "evidence_recall_direct": mean(rec["recall_direct"]),
            "evidence_recall_layers": mean(rec["recall_layers"]),
            "evidence_recall_attended": mean(rec["recall_attended"]),
            "questions": total,
            "accuracy_half_width": half_width(rec["hits"]),
            "hits": rec["hits"],
        })
        if dense_hits and label != "dense":
            diff = paired_difference(rec["hits"], dense_hits)
            if diff is not None:
                rows[-1]["vs_dense"] = {"difference": diff[0], "half_width": diff[1]}
    for r in rows:
        if "accuracy" in r and dense_acc:
            r["retained"] = r["accuracy"] / dense_acc
    return {"model": lm.describe(), "questions": n, "seed": seed, "seconds": round(seconds, 1), "rows": rows,
            "measured": "exact-match accuracy of greedy answers on generated held-out scenes; evidence recall from "
                        "the trace's patches: represented (kept or inside a merged token) and kept directly",
            "counting": "equal tokens = mean visual tokens per decoder layer counted at each layer's input (FLOPs); "
                        "equal tokens out = a pruning layer counted at its output (the reference's figure); paper "
                        "accounting = each method's published setting, flops = equal input-counted tokens"}


def markdown(result: dict) -> str:
    rows = [r for r in result["rows"] if "accuracy" in r]
    fams = list(rows[0]["per_family"]) if rows else []
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}"  # noqa: E731
    head = ["setting", "equal tokens (in)", "equal tokens (out)", "accuracy %", "± 95%", "vs dense (paired) pts",
            "retained %",
            "evidence represented last %", "evidence kept directly last %", "evidence represented avg layers %",
            *fams]
    lines = [
        f"Model: {result['model']['name']} ({result['model']['architecture']}, {result['model']['decoder_layers']} "
        f"layers, {result['model']['visual_tokens']} visual tokens); {result['questions']} held-out questions "
        f"(world {result['world']}, seed {result['seed']}); {result['seconds']:.0f} s on "
        f"{result['model']['device']}.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        vd = r.get("vs_dense")
        cells = [r["setting"], f"{r['equal_tokens']:.1f}", f"{r['equal_tokens_output']:.1f}", pct(r["accuracy"]),
                 pct(r.get("accuracy_half_width")),
                 "-" if vd is None else f"{100 * vd['difference']:+.1f} ± {100 * vd['half_width']:.1f}",
                 pct(r.get("retained")), pct(r["evidence_recall_last"]), pct(r["evidence_recall_direct"]),
                 pct(r["evidence_recall_layers"]),
                 *[pct(r["per_family"].get(f)) for f in fams]]
        lines.append("| " + " | ".join(cells) + " |")
    for r in result["rows"]:
        if "unavailable" in r:
            lines.append(f"\n{r['setting']}: not run - {r['unavailable']}")
    lines += ["", "± 95%: interval half-width of the accuracy (normal approximation, questions as the unit). vs dense: "
              "the accuracy difference from dense on the same questions, with its paired 95% half-width."]
    for accounting in ("paper", "flops"):
        order = ordering(result, 64, accounting)
        if len(order) < 2:
            continue
        lines += ["", f"Ordering at 64 tokens, {accounting} accounting (best first; each step down is the paired "
                  "difference to the next setting, * where it is outside its 95% interval):", ""]
        steps = []
        for item in order:
            nxt = item.get("vs_next")
            gap = "" if nxt is None else (f" {'>' if nxt['outside_noise'] else '≈'} "
                                          f"({100 * nxt['difference']:+.1f} ± {100 * nxt['half_width']:.1f}"
                                          f"{'*' if nxt['outside_noise'] else ''})")
            steps.append(f"{item['method']} {pct(item['accuracy'])}{gap}")
        lines.append(" ".join(steps))
    return "\n".join(lines)


def _curves(result: dict) -> dict[tuple[str, str], list[dict]]:
    """(method, accounting) -> its fixed-budget rows by equal tokens; dense under ("dense", ""). The adaptive
    SparseVLM settings (paper eq. 8, reference code) are single points, not part of a budget curve."""
    out: dict[tuple[str, str], list[dict]] = {}
    for r in result["rows"]:
        if "accuracy" not in r:
            continue
        if r["method"] == "dense":
            out.setdefault(("dense", ""), []).append(r)
        elif r["setting"] == f"{r['method']}-{r['budget']}-{r['accounting']}":
            out.setdefault((r["method"], r["accounting"]), []).append(r)
    return {k: sorted(v, key=lambda r: r["equal_tokens"]) for k, v in out.items()}


# One colour per method, the same in both figures (matplotlib's tab10).
METHOD_COLOURS = {"dense": "#000000", "sparsevlm": "#d62728", "sparsevlm-v2": "#ff7f0e", "fastv": "#1f77b4",
                  "fastervlm": "#2ca02c", "visionzip": "#17becf", "divprune": "#9467bd", "pyramiddrop": "#8c564b",
                  "dart": "#e377c2", "random": "#7f7f7f"}


def figure(result: dict):
    """Accuracy vs input-counted equal tokens, one line per method and accounting (FasterVLM paper, Fig. 2)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for (method, accounting), rows in _curves(result).items():
        name = method if method == "dense" else f"{method} ({accounting})"
        fig.add_trace(go.Scatter(x=[r["equal_tokens"] for r in rows], y=[100 * r["accuracy"] for r in rows],
                                 text=[r["setting"] for r in rows], name=name,
                                 mode="lines+markers" if method != "dense" else "markers",
                                 line={"color": METHOD_COLOURS.get(method), "dash": "dot" if accounting == "paper"
                                       else "solid"}))
    fig.update_layout(title="Accuracy vs equal visual tokens (measured); solid: flops accounting, dotted: paper",
                      xaxis_title="equal tokens, input-counted (mean visual tokens each decoder layer processes)",
                      yaxis_title="exact-match accuracy (%)", xaxis_type="log", template="plotly_white",
                      width=900, height=540)
    return fig


def png(result: dict, path: Path) -> None:
    """A plain PIL rendering (no browser or kaleido needed): one panel per accounting, a colour per method."""
    import math

    from PIL import Image, ImageDraw

    curves = _curves(result)
    accountings = sorted({a for _, a in curves if a}, key=lambda a: ("paper", "flops").index(a)
                         if a in ("paper", "flops") else 9)
    panel_w, h, m, legend_w = 420, 520, 55, 150
    w = panel_w * max(1, len(accountings)) + legend_w
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    xs = [math.log(max(r["equal_tokens"], 1)) for rows in curves.values() for r in rows]
    x0, x1 = min(xs) - 0.1, max(xs) + 0.1
    fy = lambda a: h - m - a * (h - 2 * m)  # noqa: E731
    d.text((m, 12), "Accuracy vs equal visual tokens (measured); x: input-counted equal tokens, log scale",
           fill="black")
    for k, accounting in enumerate(accountings):
        left, right = k * panel_w + m, (k + 1) * panel_w - 10
        fx = lambda t, left=left, right=right: left + (math.log(max(t, 1)) - x0) / (x1 - x0) * (right - left)  # noqa: E731
        d.rectangle([left, m, right, h - m], outline="black")
        d.text((left + 5, m - 18), f"{accounting} accounting", fill="black")
        for a in (0, 0.25, 0.5, 0.75, 1.0):
            d.text((left - 38, fy(a) - 6), f"{int(a * 100)}%", fill="black")
            d.line([(left, fy(a)), (right, fy(a))], fill="#e5e7eb")
        for t in (64, 96, 128, 192, 576):
            if x0 <= math.log(t) <= x1:
                d.text((fx(t) - 8, h - m + 8), str(t), fill="black")
        for (method, acc), rows in curves.items():
            if acc not in (accounting, ""):
                continue
            c = METHOD_COLOURS.get(method, "purple")
            pts = [(fx(r["equal_tokens"]), fy(r["accuracy"])) for r in rows]
            if len(pts) > 1:
                d.line(pts, fill=c, width=2)
            for p in pts:
                d.ellipse([p[0] - 4, p[1] - 4, p[0] + 4, p[1] + 4], fill=c)
    for k, method in enumerate(dict.fromkeys(mth for mth, _ in curves)):
        d.text((w - legend_w + 10, m + 10 + 18 * k), f"- {method}", fill=METHOD_COLOURS.get(method, "purple"))
    img.save(path)


def main(args) -> int:
    lm = load_model(args.model or DEFAULT_MODEL)
    labels = args.methods.split(",") if args.methods else None
    accountings = ACCOUNTINGS if getattr(args, "accounting", "both") == "both" else (args.accounting,)
    result = evaluate(lm, args.n, args.seed, labels, log=None if args.json else print, accountings=accountings)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "benchmark.json").write_text(json.dumps(result, indent=1))
        (out / "benchmark.md").write_text(markdown(result) + "\n")
        figure(result).write_html(out / "benchmark.html", include_plotlyjs="cdn")
        png(result, out / "benchmark.png")
    print(json.dumps(result) if args.json else markdown(result))
    return 0
