"""The benchmark's run: which settings it compares, and the loop that asks every held-out question of each of
them and tallies accuracy, evidence recall and cost per setting.

Budgets follow the model's family (`config.budgets_for`): LLaVA-1.5's 192 / 128 / 96 / 64 (`BUDGETS`),
LLaVA-NeXT's 640 / 320 / 160 (the papers' budgets for it). Evidence recall is measured in visual tokens: a world's
evidence cells (its picture's 14-px grid) are read through each request's layout (`recall.evidence_tokens`)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from PIL import Image

from ..config import ACCOUNTINGS, FIXED_BUDGETS, NEXT_BUDGETS, PruneConfig, budgets_for
from ..errors import ConfigError
from ..loading import LoadedModel
from ..methods import METHODS, get_method
from ..options import setting_label
from ..pipeline import Decoding, layout_for, run_shared
from ..trace import PruneTrace
from .recall import evidence_recall, evidence_tokens
from .stats import half_width, paired_difference

BUDGETS = FIXED_BUDGETS  # LLaVA-1.5's (192, 128, 96, 64); a LLaVA-NeXT model's are config.NEXT_BUDGETS
PAPER_BUDGETS = tuple(dict.fromkeys((*FIXED_BUDGETS, *NEXT_BUDGETS)))  # what a setting's label may name
BENCHMARK_SEED = 12345  # the 336 px worlds' benchmark questions (docs/benchmarks.md); others: the world's own


@dataclass(frozen=True)
class Setting:
    label: str
    method: str
    config: PruneConfig


def settings(accountings: tuple[str, ...] = ACCOUNTINGS, budgets: tuple[int, ...] = BUDGETS) -> list[Setting]:
    """Dense, then every registered method at every budget in each accounting, then SparseVLM's adaptive modes."""
    out = [Setting("dense", "dense", PruneConfig(method="dense"))]
    for accounting in accountings:
        for method in METHODS:
            if method == "dense" or not get_method(method).budgeted:
                continue
            for b in budgets:
                out.append(Setting(f"{method}-{b}-{accounting}", method,
                                   PruneConfig(method=method, budget=b, accounting=accounting)))
    for method in METHODS:  # methods whose own rule sets the counts: at their benchmark settings, no budget
        for opts in get_method(method).benchmark_options:
            out.append(Setting(setting_label(method, opts), method, PruneConfig(method=method, options=dict(opts))))
    out.append(Setting("sparsevlm-paper-l1", "sparsevlm", PruneConfig(method="sparsevlm", count_mode="paper", lam=1.0)))
    out.append(Setting("sparsevlm-code-9/6", "sparsevlm",
                       PruneConfig(method="sparsevlm", count_mode="code", scale=9, bias=6)))
    return out


MAX_NEW_TOKENS = 3  # the benchmark's answers are a word or two, matched exactly


def evaluate(lm: LoadedModel, n: int, seed: int | None, labels: list[str] | None = None, log=print,
             accountings: tuple[str, ...] = ACCOUNTINGS, world: str | None = None,
             budgets: tuple[int, ...] | None = None) -> dict:
    """Ask `n` held-out questions of generated scenes under every chosen setting (`labels`: setting labels; default
    every one of `settings(accountings, budgets)`) and tally each setting's accuracy, evidence recall and cost.

    `budgets`: the fixed budgets of the default settings, by default the model's family's (`config.budgets_for`:
    192 / 128 / 96 / 64 on LLaVA-1.5, 640 / 320 / 160 on LLaVA-NeXT). A label may name a method at any of the
    papers' budgets of either family (`PAPER_BUDGETS`) or of `budgets`; `check_labels` holds labels to one
    model's own (the command does).

    Each question is one request through the pipeline, as the app's compare runs it (`pipeline.run_shared`): the
    question and the context length are checked, the processor and the vision tower + projector run once, and
    every setting answers greedily (at most MAX_NEW_TOKENS new tokens) from that one encoded image. The figures
    are read from each run's trace.

    A label that names no setting asked for is refused before any question. A setting the model cannot run (a
    budget larger than its grid, FasterVLM without [CLS]) is refused at the first question, reported as
    unavailable with the reason, and not asked again; a refusal at a later question stops the benchmark with the
    setting and the question named. In a world whose pictures differ in size (the high-resolution worlds), a
    LLaVA-NeXT picture's token count follows its size: a budget larger than the fewest visual tokens any of the
    world's sizes gets on this model is reported unavailable before any question, naming that size.

    `world`: whose scenes (default: the model's own, read from its folder's training_state.json, so the benchmark
    asks each embedded model what it was trained to answer; the embedded model's world for a model that records
    none, such as a hub checkpoint, and the log says so). A LLaVA-1.5 model is given a high-resolution picture
    squeezed to 336x336, as `training/evaluate_next.py` gives it. `seed`: None asks the benchmark's questions
    (BENCHMARK_SEED in the 336 px worlds; in the high-resolution worlds their own held-out set, the questions
    `training/evaluate_next.py` asks).

    Evidence recall is measured in visual tokens: the question's evidence cells are read through the request's
    layout (`recall.evidence_tokens`); on LLaVA-1.5's 24x24 grid of a 336 px picture these are the cells
    themselves. A question whose evidence reaches no token (none in the question, or none inside the view) has
    no recall."""
    from ..scenes.world import FAMILIES, IMAGE_SIZE
    from ..scenes.worlds import (
        DEFAULT_SEEDS,
        DEFAULT_WORLD,
        HIRES_WORLDS,
        check_world,
        heldout_item,
        picture_sizes,
        world_of_model,
    )

    budgets = budgets_for(lm.anyres) if budgets is None else tuple(int(b) for b in budgets)
    allowed = tuple(dict.fromkeys((*budgets, *PAPER_BUDGETS)))
    _check_labels(labels, accountings, allowed, budgets)
    if world is None:
        world = world_of_model(getattr(lm.model, "name_or_path", None) or None)
        if world is None:
            world = DEFAULT_WORLD
            if log:
                log(f"{lm.name} records no world of its own: asking questions of the embedded model's world "
                    f"({world})")
    world = check_world(world)
    hires = world in HIRES_WORLDS
    if seed is None:
        seed = DEFAULT_SEEDS[world] if hires else BENCHMARK_SEED
    squeeze = hires and not lm.anyres  # LLaVA-1.5's one view: the whole picture squeezed, as evaluate_next does

    def view(image):
        return image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC) if squeeze else image

    every = settings(accountings, budgets if labels is None else allowed)
    chosen = [s for s in every if labels is None or s.label in labels]
    budgeted = {s.label: s.method != "dense" and get_method(s.method).budgeted for s in chosen}
    per = {s.label: {"method": s.method, "accounting": s.config.accounting if budgeted[s.label] else None,
                     "budget": s.config.budget if budgeted[s.label] else None,
                     "options": s.config.resolved_options(), "flops_ratio": [], "kv_ratio": [],
                     "attended_share": [], "attended_visual": [], "recall_attended": [],
                     "correct": {f: 0 for f in FAMILIES}, "total": {f: 0 for f in FAMILIES}, "recall_last": [],
                     "recall_direct": [], "recall_layers": [], "equal_tokens": [], "equal_tokens_output": [],
                     "hits": []} for s in chosen}
    sizes = picture_sizes(world)
    if lm.anyres and len(sizes) > 1:  # the smallest picture's token count bounds every budget, known beforehand
        fewest, size = min((layout_for(lm, s).total, s) for s in sizes)
        for s in chosen:
            if budgeted[s.label] and s.config.budget > fewest:
                per[s.label]["unavailable"] = (
                    f"budget {s.config.budget} is larger than the image grid of a {size[0]}x{size[1]} picture "
                    f"({fewest} visual tokens on this model), the smallest the {world} world draws")
    decoding = Decoding(max_new_tokens=MAX_NEW_TOKENS)
    depth = lm.num_layers
    asked = [s for s in chosen if "unavailable" not in per[s.label]]  # those refused at the first question drop out
    t0 = time.time()
    for i in range(n):
        if not asked:
            break
        item = heldout_item(i, seed, world)
        sample = item.sample
        image = view(item.image)
        results = run_shared(lm, image, sample.question, [s.config for s in asked], decoding)
        evidence = None  # the evidence as the request's visual tokens (one layout for every setting)
        for s, result in zip(asked, results, strict=True):
            if isinstance(result, ConfigError):
                if i > 0:
                    raise ConfigError(f"{s.label} answered {i} question{'s' if i > 1 else ''} and was refused at "
                                      f"question {i + 1} of {n}: {result}")
                per[s.label]["unavailable"] = str(result)
                continue
            if evidence is None:
                evidence = evidence_tokens(sample.evidence, result.trace.visual_layout(), item.image.size)
            _tally(per[s.label], result.trace, sample, depth, evidence)
        asked = [s for s in asked if "unavailable" not in per[s.label]]
        if log and (i + 1) % max(1, n // 10) == 0:
            log(f"  {i + 1}/{n} questions, {time.time() - t0:.0f} s")
    out = {**summarize(per, lm, n, seed, time.time() - t0), "world": world}
    if lm.anyres or hires:
        out["budgets"] = list(budgets)
        out["measured"] = (
            "exact-match accuracy of greedy answers on generated held-out scenes; evidence recall in visual tokens: "
            "a token is evidence when the question's evidence cells (the picture's 14-px grid at full resolution) "
            "cover >= 5% of its box in the request's layout, newline tokens never; represented (kept or inside a "
            "merged token) and kept directly")
        if squeeze:
            out["picture"] = f"squeezed to {IMAGE_SIZE}x{IMAGE_SIZE} for the model's one view"
    return out


def check_labels(labels: list[str] | None, accountings: tuple[str, ...], budgets: tuple[int, ...]) -> None:
    """Labels that name settings at `budgets` only (the command: the loaded model's own, `config.budgets_for`);
    a ConfigError that says which labels do not, and which budgets a model of each family is benchmarked at."""
    _check_labels(labels, accountings, tuple(budgets), tuple(budgets))


def _check_labels(labels: list[str] | None, accountings: tuple[str, ...], allowed: tuple[int, ...] = BUDGETS,
                  budgets: tuple[int, ...] = BUDGETS) -> None:
    """A label that names no setting asked for is an error, not a setting silently left out. `allowed`: the
    budgets a label may name; `budgets`: the model's, named in the message."""
    here = {s.label for s in settings(accountings, allowed)}
    every = settings(budgets=allowed)
    nowhere = [label for label in labels or () if label not in {s.label for s in every}]
    elsewhere = [label for label in labels or () if label not in here and label not in nowhere]
    problems = []
    if nowhere:
        others = [s.label for s in settings() if s.label != "dense" and s.label not in _budgeted_labels(settings())]
        if set(budgets) == set(BUDGETS) and set(allowed) <= set(PAPER_BUDGETS):
            which = f"budgets {', '.join(map(str, budgets))}"
        else:
            which = (f"this model's budgets {', '.join(map(str, budgets))}; LLaVA-1.5 models are benchmarked at "
                     f"{', '.join(map(str, FIXED_BUDGETS))}, LLaVA-NeXT models at {', '.join(map(str, NEXT_BUDGETS))}")
        problems.append(f"no benchmark setting is named {', '.join(nowhere)}: a setting is dense, a method at a "
                        f"budget in an accounting (METHOD-BUDGET-ACCOUNTING, e.g. sparsevlm-{min(budgets)}-paper; "
                        f"{which}), or one of {', '.join(others)}")
    if elsewhere:
        problems.append(f"{', '.join(elsewhere)} {'is' if len(elsewhere) == 1 else 'are'} not among the settings of "
                        f"the {' and '.join(accountings)} accounting asked for")
    if problems:
        raise ConfigError("; ".join(problems))


def _budgeted_labels(every: list[Setting]) -> set[str]:
    return {f"{s.method}-{s.config.budget}-{s.config.accounting}" for s in every}


def _tally(rec: dict, trace: PruneTrace, sample, depth: int, evidence: list[int]) -> None:
    """Add one run (its trace) of one question (`sample`: question, answer, family; `evidence`: its evidence as
    the request's visual tokens) to a setting's tally."""
    hit = int(trace.answer.lower() == sample.answer.lower())
    rec["total"][sample.family] += 1
    rec["correct"][sample.family] += hit
    rec["hits"].append(hit)
    recall = evidence_recall(trace, evidence, depth)
    if recall is not None:
        rec["recall_last"].append(recall["represented"])
        rec["recall_direct"].append(recall["kept"])
        rec["recall_layers"].append(recall["represented_mean_over_layers"])
        if "attended_mean_over_layers" in recall:
            rec["recall_attended"].append(recall["attended_mean_over_layers"])
    cost = trace.cost
    rec["flops_ratio"].append(cost.prefill_flops / cost.prefill_flops_dense)
    rec["kv_ratio"].append(cost.kv_bytes / cost.kv_bytes_dense)
    if cost.attended_share is not None:
        rec["attended_share"].append(cost.attended_share)
        rec["attended_visual"].append(cost.attended_visual)
    rec["equal_tokens"].append(cost.equal_tokens)
    rec["equal_tokens_output"].append(cost.equal_tokens_reference)


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
