"""A scenes model's measured figures, read back from the JSON files in its folder: the model card, the ship gate
and the test floors all come from here, so no figure is ever typed by hand.

    python -m training.model_card --model DIR --write         # DIR/README.md from DIR's JSON files
    python -m training.model_card --model DIR --check-bars    # exit 3 unless the quality bars are met

Files a model folder holds (scripts/ship_v2.sh writes them):
- `eval_heldout_<n>.json`, `eval_<world>_<n>.json`: `python -m training.evaluate --json` results; the key
  "world" says whose held-out set (a file without it counts for no world);
- `likeness_<n>.json`: `python -m training.likeness --json` summary; `likeness_previous.json`: the summary of
  the model it replaced, and `likeness_compare.md`: the two side by side (`likeness --compare`);
- `training_state.json`: the exporter's record (phase, step, seconds, the last phase's arguments, "world").
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from sparsevlm.scenes.world import FAMILIES
from sparsevlm.scenes.worlds import WORLD_LABELS, world_of_model

from . import attention_profile
from .likeness import tower_rows

# The quality bars an embedded model must meet to be installed: on >= 3000 held-out questions of its own world,
# >= 97% overall and >= 90% in every family; on >= 3000 of the independent renderer's, >= 90% overall.
BAR_QUESTIONS = 3000
BAR_OWN_OVERALL = 0.97
BAR_OWN_FAMILY = 0.90
BAR_INDEPENDENT_OVERALL = 0.90
TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_v2.sh"  # every phase's command
CLIP_SCRIPT = TRAIN_SCRIPT.with_name("train_clip_tower.sh")  # the tower's CLIP phase and the phases on top


def eval_records(model_dir: str | Path) -> dict[str, dict]:
    """Per world, the evaluation with the most questions among the folder's `eval_*.json` files (each result gets
    its file name under "file")."""
    best: dict[str, dict] = {}
    for f in sorted(Path(model_dir).glob("eval_*.json")):
        try:
            r = json.loads(f.read_text())
            total = int(r["overall"]["total"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        world = r.get("world")
        if world is None:  # whose questions it asked is not recorded: it stands for no world
            continue
        if world not in best or total > best[world]["overall"]["total"]:
            best[world] = {**r, "world": world, "file": f.name}
    return best


def own_eval(model_dir: str | Path) -> dict | None:
    """The evaluation on the model's own world (`world_of_model`), None if the folder has none or records no
    world."""
    world = world_of_model(model_dir)
    return None if world is None else eval_records(model_dir).get(world)


def accuracy_floor(accuracy: float, n: int) -> float:
    """The least share of `n` questions a model measured at `accuracy` should get right, for a test that must not
    flake: three binomial standard deviations and one question below the measurement."""
    return max(0.0, accuracy - 3 * math.sqrt(accuracy * (1 - accuracy) / n) - 1 / n)


def check_bars(model_dir: str | Path) -> list[str]:
    """What keeps the model from meeting the quality bars (empty: all met), from its recorded evaluations."""
    evals = eval_records(model_dir)
    world = world_of_model(model_dir)
    missing = [] if world else [f"{model_dir} records no world of its own (training_state.json \"world\")"]
    own, ind = (evals.get(world) if world else None), evals.get("independent")
    for name, r in ([(f"{world} held-out", own)] if world else []) + [("independent", ind)]:
        if r is None:
            missing.append(f"no evaluation on the {name} set in {model_dir}")
        elif r["overall"]["total"] < BAR_QUESTIONS:
            missing.append(f"{name}: only {r['overall']['total']} questions evaluated (the bar needs {BAR_QUESTIONS})")
    if own is not None:
        if own["overall"]["accuracy"] < BAR_OWN_OVERALL:
            missing.append(f"{world} held-out overall {100 * own['overall']['accuracy']:.1f}% < "
                           f"{100 * BAR_OWN_OVERALL:.0f}%")
        for f in FAMILIES:
            if f in own and own[f]["accuracy"] < BAR_OWN_FAMILY:
                missing.append(f"{world} held-out {f} {100 * own[f]['accuracy']:.1f}% < {100 * BAR_OWN_FAMILY:.0f}%")
    if ind is not None and ind["overall"]["accuracy"] < BAR_INDEPENDENT_OVERALL:
        missing.append(f"independent overall {100 * ind['overall']['accuracy']:.1f}% < "
                       f"{100 * BAR_INDEPENDENT_OVERALL:.0f}%")
    return missing


# The goals of a model whose decoder attends as LLaVA-1.5's does (docs/model.md, "Toward LLaVA's recipe"): at FastV's
# layer and SparseVLM's first pruning layer, the last token's attention shifted to the lower half and dispersed as
# FasterVLM measures it on LLaVA-1.5-7B; the [CLS] still on the objects; raters content words; accuracy a few points
# below the quality bars on purpose.
GOAL_LOWER_HALF = 0.55
GOAL_TOP20 = (0.45, 0.80)
GOAL_CLS_OBJECTS = 1.5
GOAL_CONTENT_RATERS = 0.55
GOAL_OWN = 0.93
GOAL_INDEPENDENT = 0.88


def likeness_summary(model_dir: str | Path) -> dict | None:
    """The summary of the folder's largest `likeness_<n>.json`, None without one."""
    files = [f for f in Path(model_dir).glob("likeness_*.json") if f.stem.split("_")[-1].isdigit()]
    if not files:
        return None
    return json.loads(max(files, key=lambda f: int(f.stem.split("_")[-1])).read_text())["summary"]


def check_attention_goals(model_dir: str | Path) -> list[str]:
    """What keeps the model from the LLaVA-attention goals (empty: all met), from its recorded figures."""
    from .attention_profile import profile_layers

    missing: list[str] = []
    s = likeness_summary(model_dir)
    prof = (s or {}).get("attention_profile")
    if not prof:
        missing.append("no attention profile recorded (likeness_<n>.json 'attention_profile')")
    else:
        layers = profile_layers(prof["depth"])
        goal_layers = [min(la for la, who in layers.items() if "fastv" in who),
                       min(la for la, who in layers.items() if "sparsevlm" in who)]
        by_layer = {d["layer"]: d for d in prof["all"]["decoder"]}
        for la in dict.fromkeys(goal_layers):
            low, top = by_layer[la]["last"]["lower_half_share"][0], by_layer[la]["last"]["top20_share"][0]
            if low < GOAL_LOWER_HALF:
                missing.append(f"layer {la}: last-token lower-half share {low:.2f} < {GOAL_LOWER_HALF}")
            if not GOAL_TOP20[0] <= top <= GOAL_TOP20[1]:
                lo, hi = GOAL_TOP20
                missing.append(f"layer {la}: last-token top-20% share {top:.2f} outside {lo}-{hi}")
    tower = (s or {}).get("tower")
    ratio = tower["cls"]["cls_object_attention_vs_area"] if tower else None
    if ratio is None or ratio < GOAL_CLS_OBJECTS:
        missing.append(f"[CLS] on objects {ratio if ratio is not None else 'not measured'} x their area share "
                       f"(goal >= {GOAL_CLS_OBJECTS})")
    content = s["raters"]["classes"]["content"]["share_of_raters"][0] if s else None
    if content is None or content < GOAL_CONTENT_RATERS:
        missing.append(f"content-word raters {'not measured' if content is None else f'{100 * content:.1f}%'} "
                       f"(goal >= {100 * GOAL_CONTENT_RATERS:.0f}%)")
    evals = eval_records(model_dir)
    world = world_of_model(model_dir)
    for name, r, goal in ((f"{world} held-out", evals.get(world) if world else None, GOAL_OWN),
                          ("independent", evals.get("independent"), GOAL_INDEPENDENT)):
        if r is None:
            missing.append(f"no evaluation on the {name} set")
        elif r["overall"]["accuracy"] < goal:
            missing.append(f"{name} {100 * r['overall']['accuracy']:.1f}% < {100 * goal:.0f}%")
        elif r["overall"]["total"] < BAR_QUESTIONS:
            missing.append(f"{name}: only {r['overall']['total']} questions evaluated (the goal needs {BAR_QUESTIONS})")
    return missing


def _world_words(world: str | None) -> str:
    """"world v2", or words that say no world is recorded."""
    return f"world {world}" if world else "a world not recorded"


def _pct(r: dict) -> str:
    return f"{100 * r['accuracy']:.1f}% ({r['correct']}/{r['total']})"


def _eval_table(evals: dict[str, dict]) -> list[str]:
    lines = ["| set | " + " | ".join(FAMILIES) + " | overall | file |", "|---|" + "---|" * (len(FAMILIES) + 2)]
    for world, r in evals.items():
        cells = [_pct(r[f]) if f in r else "-" for f in FAMILIES]
        lines.append(f"| {WORLD_LABELS.get(world, world)} | " + " | ".join(cells)
                     + f" | **{_pct(r['overall'])}** | `{r['file']}` |")
    return lines


def _likeness_lines(model_dir: Path) -> list[str]:
    files = sorted(model_dir.glob("likeness_*.json"), key=lambda f: f.stat().st_size)
    files = [f for f in files if f.stem.split("_")[-1].isdigit()]
    if not files:
        return ["No likeness measurement in this folder yet (`python -m training.likeness --json`)."]
    f = max(files, key=lambda f: int(f.stem.split("_")[-1]))
    s = json.loads(f.read_text())["summary"]
    val = lambda x: float("nan") if x is None or x[0] is None else 100 * x[0]  # noqa: E731
    classes = s["raters"]["classes"]
    lines = [
        f"Measured by `{s.get('command', 'python -m training.likeness')}` on {s['questions']} held-out "
        f"questions of {_world_words(s.get('world'))} (`{f.name}`).",
        "",
        "| rater class | share of raters | share of text |",
        "|---|---|---|",
        *(f"| {c} | {val(v['share_of_raters']):.1f}% | {val(v['share_of_text']):.1f}% |" for c, v in classes.items()),
        "",
        "Most frequent raters: " + ", ".join(f"`{w['word']}` ({100 * w['share_of_raters']:.1f}%)"
                                             for w in s["raters"]["top_words"][:8]) + ".",
        "",
        f"Top-{s['top_k']} evidence recall of attention rows (dense forward; random k-subset "
        f"{s['evidence_recall']['random']:.3f}):",
        "",
        "| layer | raters | last token | content words | function words |",
        "|---|---|---|---|---|",
    ]
    for layer in s["layers"]:
        row = s["evidence_recall"]["by_layer"][str(layer)]
        cell = lambda t, row=row: "n/a" if not row.get(t) or row[t]["recall"][0] is None else f"{row[t]['recall'][0]:.3f}"  # noqa: E731,E501
        lines.append(f"| {layer} | {cell('raters')} | {cell('last')} | {cell('content')} | {cell('function')} |")
    nw = s["nearest_word"]["all evidence patches"]
    lines += ["", f"Object patches whose projector output's nearest word embedding is the object's colour word: "
              f"{val(nw['nearest_is_colour_word']):.1f}%, its shape word: {val(nw['nearest_is_shape_word']):.1f}%."]
    lines += ["", "The vision tower and the decoder's view of it (`training/clip_tower.py`):", "",
              "| measure | value |", "|---|---|", *(f"| {m} | {v} |" for m, v in tower_rows(s))]
    prof = s.get("attention_profile")
    if prof:
        lines += ["", *attention_profile.markdown(prof, "### Attention shift and dispersion (FasterVLM)")]
        lines += [f"Measured by `{prof.get('command') or s.get('command', 'python -m training.likeness')}`."]
    else:
        lines += ["", "No attention profile (FasterVLM's shift and dispersion) in this summary yet "
                  "(`python -m training.likeness --add-profile FILE`)."]
    return lines


def _where_trained(state: dict) -> str:
    device = str((state.get("args") or {}).get("device", "cpu"))
    return "CPU-minutes" if device == "cpu" else f"minutes on a CUDA GPU (`--device {device}`)"


def card(model_dir: str | Path) -> str:
    """The model card (markdown) of a scenes model folder, every figure read from the folder's files."""
    d = Path(model_dir)
    config = json.loads((d / "config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    state = json.loads((d / "training_state.json").read_text()) if (d / "training_state.json").is_file() else {}
    world = world_of_model(d)
    size = sum(p.stat().st_size for p in d.rglob("*") if p.is_file() and p.name != "README.md")
    evals = eval_records(d)
    missing = check_bars(d)
    lines = [
        f"# {d.name}: a LLaVA trained on generated scenes ({_world_words(world)})",
        "",
        "Generated by `python -m training.model_card --model DIR --write` from the JSON files in this "
        "folder (scripts/ship_v2.sh); no figure here is typed by hand.",
        "",
        f"- Architecture: `LlavaForConditionalGeneration`; CLIP vision tower {vision['image_size']}/"
        f"{vision['patch_size']} with [CLS] ({vision['num_hidden_layers']} layers x {vision['hidden_size']}), "
        f"feature layer {config.get('vision_feature_layer')}, GELU projector, Llama decoder "
        f"{text['num_hidden_layers']} layers x {text['hidden_size']} (GQA {text['num_attention_heads']}/"
        f"{text['num_key_value_heads']}), vocabulary {text['vocab_size']} words.",
        f"- Folder size without this card: {size / 2**20:.1f} MiB (computed).",
        f"- World: {WORLD_LABELS[world] if world else 'not recorded in training_state.json'}.",
        f"- Training state: phase `{state.get('phase', '?')}`, step {state.get('step', '?')}, "
        f"{state.get('train_seconds', float('nan')) / 60:.0f} {_where_trained(state)} in the last phase (recorded "
        "by the exporter).",
        "",
        "## Dense exact match on held-out questions (measured)",
        "",
        *_eval_table(evals),
        "",
        f"Quality bars (>= {BAR_QUESTIONS} questions; own world >= {100 * BAR_OWN_OVERALL:.0f}% overall and >= "
        f"{100 * BAR_OWN_FAMILY:.0f}% per family; independent >= {100 * BAR_INDEPENDENT_OVERALL:.0f}%): "
        + ("**met**." if not missing else "**not met**: " + "; ".join(missing) + "."),
        "",
        f"Goals of a decoder that attends as LLaVA-1.5's (docs/model.md; FastV's and SparseVLM's first layers: "
        f"last-token lower-half share >= {GOAL_LOWER_HALF}, top-20% share {GOAL_TOP20[0]}-{GOAL_TOP20[1]}; [CLS] on "
        f"objects >= {GOAL_CLS_OBJECTS}x; raters >= {100 * GOAL_CONTENT_RATERS:.0f}% content words; own world >= "
        f"{100 * GOAL_OWN:.0f}%, independent >= {100 * GOAL_INDEPENDENT:.0f}%): "
        + ("met." if not (goals := check_attention_goals(d)) else "not met: " + "; ".join(goals) + "."),
        "",
        "## LLaVA-likeness (measured)",
        "",
        *_likeness_lines(d),
        "",
    ]
    if (d / "likeness_compare.md").is_file():
        compare = (d / "likeness_compare.md").read_text().splitlines()
        lines += ["## Beside the previous embedded model", "", *compare[1:], ""]  # its own title dropped
    def commands(script: Path) -> list[str]:
        text = script.read_text().splitlines() if script.is_file() else []
        return [ln for ln in text if ln.strip() and not ln.lstrip().startswith("#")
                and not ln.startswith(("set ", "cd ", "echo "))]

    clip = []
    if (state.get("tower") or {}).get("contrastive"):
        clip = ["", "Then the tower's CLIP phase and the phases on top of it: `bash scripts/train_clip_tower.sh` "
                "(why each setting: its comments and docs/model.md), with these commands:", "", "```bash",
                *commands(CLIP_SCRIPT), "```"]
    lines += [
        "## How it was made",
        "",
        "Every phase, resumable, in order: `bash scripts/train_v2.sh` (why each setting: the script's comments and "
        "docs/model.md). Its commands as this repository holds them (environment variables override the step "
        "counts):",
        "",
        "```bash",
        *commands(TRAIN_SCRIPT),
        "```",
        *clip,
        "",
        "The last phase's arguments, as the exporter recorded them:",
        "",
        "```json",
        json.dumps(state.get("args", {}), indent=1, sort_keys=True),
        "```",
        "",
        "Installed with `bash scripts/ship_v2.sh CKPT_DIR` (export, held-out evaluations, likeness, this card, the "
        "examples). Reproduce the evaluations: " + ", ".join(
            f"`python -m training.evaluate --model {d} --world {w} --n {r['overall']['total']}`"
            for w, r in evals.items()) + ".",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.model_card", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a scenes model folder")
    p.add_argument("--write", action="store_true", help="write MODEL/README.md")
    p.add_argument("--check-bars", action="store_true", help="exit 3 unless the quality bars are met")
    p.add_argument("--check-attention-goals", action="store_true",
                   help="exit 3 unless the LLaVA-attention goals (docs/model.md) are met")
    args = p.parse_args(argv)
    d = Path(args.model)
    if not (d / "config.json").is_file():
        print(f"error: {d} is not a model folder (no config.json)", file=sys.stderr)
        return 2
    if args.write:
        (d / "README.md").write_text(card(d))
        print(f"wrote {d / 'README.md'}")
    if args.check_bars:
        missing = check_bars(d)
        for m in missing:
            print(f"bar not met: {m}")
        if missing:
            return 3
        print("quality bars: met")
    if args.check_attention_goals:
        missing = check_attention_goals(d)
        for m in missing:
            print(f"goal not met: {m}")
        if missing:
            return 3
        print("LLaVA-attention goals: met")
    if not (args.write or args.check_bars or args.check_attention_goals):
        print(card(d))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
