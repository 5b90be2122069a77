"""The benchmark's run: which settings it compares, and the loop that asks every held-out question of each of
them and tallies accuracy, evidence recall and cost per setting."""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..config import ACCOUNTINGS, PruneConfig
from ..errors import ConfigError
from ..loading import LoadedModel
from ..methods import METHODS, get_method
from ..options import setting_label
from ..pipeline import Decoding, run_shared
from ..trace import PruneTrace
from .recall import evidence_recall
from .stats import half_width, paired_difference

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


MAX_NEW_TOKENS = 3  # the benchmark's answers are a word or two, matched exactly


def evaluate(lm: LoadedModel, n: int, seed: int, labels: list[str] | None = None, log=print,
             accountings: tuple[str, ...] = ACCOUNTINGS, world: str | None = None) -> dict:
    """Ask `n` held-out questions of generated scenes under every chosen setting (`labels`: setting labels; default
    every one of `settings(accountings)`) and tally each setting's accuracy, evidence recall and cost.

    Each question is one request through the pipeline, as the app's compare runs it (`pipeline.run_shared`): the
    question and the context length are checked, the processor and the vision tower + projector run once, and
    every setting answers greedily (at most MAX_NEW_TOKENS new tokens) from that one encoded image. The figures
    are read from each run's trace.

    A label that names no setting asked for is refused before any question. A setting the model cannot run (a
    budget larger than its grid, FasterVLM without [CLS]) is refused at the first question, reported as
    unavailable with the reason, and not asked again; a refusal at a later question stops the benchmark with the
    setting and the question named.

    `world`: whose scenes (default: the model's own, read from its folder's training_state.json, so the benchmark
    asks each embedded model what it was trained to answer; the embedded model's world for a model that records
    none, such as a hub checkpoint, and the log says so)."""
    from ..scenes.world import FAMILIES
    from ..scenes.worlds import DEFAULT_WORLD, check_world, heldout_item, world_of_model

    _check_labels(labels, accountings)
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
                     "hits": []} for s in chosen}
    decoding = Decoding(max_new_tokens=MAX_NEW_TOKENS)
    depth = lm.num_layers
    asked = list(chosen)  # the settings still asked: those refused at the first question drop out
    t0 = time.time()
    for i in range(n):
        if not asked:
            break
        item = heldout_item(i, seed, world)
        sample = item.sample
        results = run_shared(lm, item.image, sample.question, [s.config for s in asked], decoding)
        for s, result in zip(asked, results, strict=True):
            if isinstance(result, ConfigError):
                if i > 0:
                    raise ConfigError(f"{s.label} answered {i} question{'s' if i > 1 else ''} and was refused at "
                                      f"question {i + 1} of {n}: {result}")
                per[s.label]["unavailable"] = str(result)
                continue
            _tally(per[s.label], result.trace, sample, depth)
        asked = [s for s in asked if "unavailable" not in per[s.label]]
        if log and (i + 1) % max(1, n // 10) == 0:
            log(f"  {i + 1}/{n} questions, {time.time() - t0:.0f} s")
    return {**summarize(per, lm, n, seed, time.time() - t0), "world": world}


def _check_labels(labels: list[str] | None, accountings: tuple[str, ...]) -> None:
    """A label that names no setting asked for is an error, not a setting silently left out."""
    here = {s.label for s in settings(accountings)}
    every = settings()
    nowhere = [label for label in labels or () if label not in {s.label for s in every}]
    elsewhere = [label for label in labels or () if label not in here and label not in nowhere]
    problems = []
    if nowhere:
        budgeted = {f"{s.method}-{s.config.budget}-{s.config.accounting}" for s in every}
        others = [s.label for s in every if s.label != "dense" and s.label not in budgeted]
        problems.append(f"no benchmark setting is named {', '.join(nowhere)}: a setting is dense, a method at a "
                        f"budget in an accounting (METHOD-BUDGET-ACCOUNTING, e.g. sparsevlm-64-paper; budgets "
                        f"{', '.join(map(str, BUDGETS))}), or one of {', '.join(others)}")
    if elsewhere:
        problems.append(f"{', '.join(elsewhere)} {'is' if len(elsewhere) == 1 else 'are'} not among the settings of "
                        f"the {' and '.join(accountings)} accounting asked for")
    if problems:
        raise ConfigError("; ".join(problems))


def _tally(rec: dict, trace: PruneTrace, sample, depth: int) -> None:
    """Add one run (its trace) of one question (`sample`: question, answer, family, evidence) to a setting's tally."""
    hit = int(trace.answer.lower() == sample.answer.lower())
    rec["total"][sample.family] += 1
    rec["correct"][sample.family] += hit
    rec["hits"].append(hit)
    recall = evidence_recall(trace, sample.evidence, depth)
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
