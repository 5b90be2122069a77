"""The benchmark's run: which settings it compares, and the loop that asks every held-out question of each of
them and tallies accuracy, evidence recall and cost per setting."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..config import ACCOUNTINGS, PruneConfig
from ..hooks import PruneHooks
from ..loading import LoadedModel
from ..methods import METHODS, get_method
from ..options import setting_label
from ..pipeline import budget_figures, build_prompt, call_cost
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
@torch.inference_mode()
def evaluate(lm: LoadedModel, n: int, seed: int, labels: list[str] | None = None, log=print,
             accountings: tuple[str, ...] = ACCOUNTINGS, world: str | None = None) -> dict:
    """`world`: whose scenes (default: the model's own, read from its folder's training_state.json, so the benchmark
    asks each embedded model what it was trained to answer; the embedded model's world for a model that records
    none, such as a hub checkpoint, and the log says so)."""
    from ..scenes.world import FAMILIES
    from ..scenes.worlds import DEFAULT_WORLD, check_world, heldout_item, world_of_model

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
