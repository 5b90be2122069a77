"""Dense accuracy on high-resolution held-out questions: scenes-llava-next, and any other scenes model on the same
questions (scenes-llava sees the whole picture squeezed into its one 336-px view).

    python -m training.evaluate_next --model checkpoints/next-export --world own --n 3000
    python -m training.evaluate_next --model checkpoints/next-export --world independent --n 3000
    python -m training.evaluate_next --model checkpoints/next-export --baseline assets/models/scenes-llava \\
        --world own --n 300 --json out.json

Worlds: `own` (`sparsevlm/scenes/hires.py`, the world the model trains on; held-out seeds) or `independent`
(`sparsevlm/scenes/independent_hires.py`, drawn by the independent renderer; no model trains on it). Held-out
picture k carries one question of each family it allows (up to 7, in family order); `--n` questions are the
first n of pictures 0, 1, 2, ... in that order, so a larger n extends a smaller one.

How a question is answered: the single-turn LLaVA prompt "USER: <image>\\n{question} ASSISTANT:", greedy, up to
2 new tokens, exact match of the decoded text (special tokens dropped) with the one-word answer. The questions of
one picture share one forward of the prompt's common prefix ("USER: <image>" and its visual tokens) and its
key/value cache, which is cropped back to the prefix after each question. The decoder is causal, so each answer is
what a separate `generate` on that question's full prompt gives; `--check K` re-answers the first K questions
with plain `model.generate` on the processor's full prompt and stops if any answer differs.

A LLaVA-1.5 model (one 336-px view) gets the picture resized to 336x336 (squeezed, bicubic); a LLaVA-NeXT model
gets it as it is (the processor makes the base view and the tiles).

`--raters` also measures SparseVLM's text raters on every question, as `training/likeness.py` does for one view:
R = mean over the visual rows of softmax(Hv Hq^T) (Hv: the visual tokens the model puts in the sequence - for
LLaVA-NeXT the base view, the unpadded tiles and the row-end newlines; Hq: the input embeddings of every text
token after the picture, "ASSISTANT :" included), raters R > mean(R) (`algorithm.select_raters`), and the share of
raters that are content words (`likeness.classify_word`), pooled over questions with the delta-method interval of
`likeness.ratio_with_error` (questions as clusters).

Intervals (95%): per family, Wilson's (a picture asks one question of a family); overall, a normal interval whose
variance treats each picture as a cluster of correlated questions (the ratio estimator's); for the paired
difference between two models on the same questions, the same cluster variance of the per-question difference.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

from sparsevlm import algorithm
from sparsevlm.scenes import hires, independent, independent_hires
from sparsevlm.scenes.world import FAMILIES, IMAGE_SIZE
from sparsevlm.tokenizer import prompt_for

from .likeness import classify_word, ratio_with_error

WORLDS = ("own", "independent")
Z = 1.959964


def heldout_picture(index: int, world: str):
    """(PIL picture, [Sample]) of held-out picture `index` of a high-resolution world."""
    if world == "own":
        scene, samples = hires.heldout_picture(index)
        return hires.render(scene), samples
    if world == "independent":
        scene, samples = independent_hires.heldout_picture(index)
        return independent.render_independent(scene), samples
    raise ValueError(f"unknown world {world!r}: choose one of {', '.join(WORLDS)}")


def heldout_questions(n: int, world: str):
    """The first `n` held-out questions as (picture index, picture, [samples of that picture among the n])."""
    out, total, k = [], 0, 0
    while total < n:
        image, samples = heldout_picture(k, world)
        samples = samples[: n - total]
        out.append((k, image, samples))
        total += len(samples)
        k += 1
    return out


def load(model_dir: str | Path):
    """(model, processor, is_next) of a scenes model folder: LLaVA-NeXT or LLaVA-1.5 by its config."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    is_next = cfg.get("model_type") == "llava_next"
    cls = LlavaNextForConditionalGeneration if is_next else LlavaForConditionalGeneration
    model = cls.from_pretrained(str(model_dir), local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(str(model_dir), local_files_only=True)
    return model, processor, is_next


def view_for(image: Image.Image, is_next: bool) -> Image.Image:
    """What the model is given: the picture itself (LLaVA-NeXT) or the whole picture squeezed to 336x336."""
    return image if is_next else image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)


@torch.no_grad()
def answer_picture(model, processor, image, questions: list[str], max_new_tokens: int = 2) -> list[str]:
    """Greedy answers to single-turn questions about one picture, sharing the prompt prefix's cache."""
    tok = processor.tokenizer
    enc = processor(images=[image], text=["USER: <image>"], return_tensors="pt")
    extra = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
    out = model(input_ids=enc["input_ids"], **extra, use_cache=True)
    cache, prefix = out.past_key_values, enc["input_ids"].shape[1]
    answers = []
    for q in questions:
        ids = torch.tensor([tok(f"{q} ASSISTANT:", add_special_tokens=False)["input_ids"]])
        new = []
        for _ in range(max_new_tokens):
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[0, -1]
            nxt = int(logits.argmax())
            new.append(nxt)
            if nxt == tok.eos_token_id:
                break
            ids = torch.tensor([[nxt]])
        cache.crop(-(cache.get_seq_length() - prefix))  # back to the prefix
        answers.append(tok.decode(new, skip_special_tokens=True).strip())
    return answers


@torch.no_grad()
def answer_generate(model, processor, image, question: str, max_new_tokens: int = 2) -> str:
    """The same answer by plain `model.generate` on the processor's full prompt (the check)."""
    enc = processor(images=[image], text=[prompt_for(question)], return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


@torch.no_grad()
def rater_counts(model, processor, image, questions: list[str]) -> list[tuple[int, int]]:
    """(raters, content-word raters) of each single-turn question about `image` (see the module's docstring)."""
    tok = processor.tokenizer
    enc = processor(images=[image], text=["USER: <image>"], return_tensors="pt")
    extra = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
    feats = model.model.get_image_features(**extra)
    feats = getattr(feats, "pooler_output", feats)
    hv = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats])  # every visual token of the sequence
    n_image = int((enc["input_ids"] == model.config.image_token_id).sum())
    if hv.shape[0] != n_image:
        raise RuntimeError(f"{hv.shape[0]} visual features for {n_image} image tokens")
    out = []
    for q in questions:
        ids = tok(f"{q} ASSISTANT:", add_special_tokens=False)["input_ids"]
        hq = model.get_input_embeddings()(torch.tensor(ids))
        raters = algorithm.select_raters(algorithm.text_relevance(hv, hq)).tolist()
        classes = [classify_word(t) for t in tok.convert_ids_to_tokens(ids)]
        out.append((len(raters), sum(classes[i] == "content" for i in raters)))
    return out


def wilson(c: int, n: int) -> tuple[float, float]:
    if n == 0:
        return 0.0, 0.0
    p = c / n
    d = 1 + Z * Z / n
    centre = (p + Z * Z / (2 * n)) / d
    half = Z * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n)) / d
    return centre - half, centre + half


def cluster_interval(values: list[list[float]]) -> tuple[float, float, float]:
    """(mean, low, high) of per-question values grouped by picture: the ratio estimator's cluster variance."""
    n = sum(len(v) for v in values)
    mean = sum(sum(v) for v in values) / n
    k = len(values)
    if k < 2:
        return mean, mean, mean
    var = k / (k - 1) * sum((sum(v) - mean * len(v)) ** 2 for v in values) / n**2
    half = Z * math.sqrt(var)
    return mean, mean - half, mean + half


def summarise(records: list[dict], key: str) -> dict:
    """Per family and overall accuracy of `key` (a model's right / wrong per question) with 95% intervals."""
    out = {}
    for f in FAMILIES:
        rs = [r for r in records if r["family"] == f]
        if rs:
            c = sum(r[key] for r in rs)
            lo, hi = wilson(c, len(rs))
            out[f] = {"correct": c, "total": len(rs), "accuracy": c / len(rs), "ci95": [lo, hi]}
    by_pic: dict[int, list[float]] = {}
    for r in records:
        by_pic.setdefault(r["picture"], []).append(float(r[key]))
    mean, lo, hi = cluster_interval(list(by_pic.values()))
    out["overall"] = {"correct": int(sum(r[key] for r in records)), "total": len(records), "accuracy": mean,
                      "ci95": [lo, hi], "pictures": len(by_pic)}
    sizes: dict[str, list[int]] = {}
    for r in records:
        c = sizes.setdefault(f"{r['size'][0]}x{r['size'][1]}", [0, 0])
        c[0] += r[key]
        c[1] += 1
    out["by_size"] = {k: {"correct": c, "total": t, "accuracy": c / t} for k, (c, t) in sorted(sizes.items())}
    return out


def paired_difference(records: list[dict], a: str, b: str) -> dict:
    by_pic: dict[int, list[float]] = {}
    for r in records:
        by_pic.setdefault(r["picture"], []).append(float(r[a]) - float(r[b]))
    mean, lo, hi = cluster_interval(list(by_pic.values()))
    return {"difference": mean, "ci95": [lo, hi], "questions": len(records)}


def evaluate(models: dict[str, tuple], n: int, world: str, check: int = 0, log_every: int = 10,
             raters: bool = False, partial: Path | None = None) -> dict:
    """Every model in `models` (name -> (model, processor, is_next)) on the first `n` held-out questions; with
    `partial`, the answers so far are written there every `log_every` pictures."""
    records: list[dict] = []
    seconds = dict.fromkeys(models, 0.0)
    checked = dict.fromkeys(models, 0)  # questions re-answered with plain generate, per model
    items = heldout_questions(n, world)
    for j, (k, image, samples) in enumerate(items):
        rec = [{"picture": k, "size": list(image.size), "family": s.family, "question": s.question,
                "answer": s.answer} for s in samples]
        for name, (model, processor, is_next) in models.items():
            view = view_for(image, is_next)
            t0 = time.time()
            preds = answer_picture(model, processor, view, [s.question for s in samples])
            seconds[name] += time.time() - t0
            for r, p in zip(rec, preds, strict=True):
                r[f"{name}_pred"] = p
                r[name] = int(p == r["answer"])
            if raters:
                for r, (nr, nc) in zip(rec, rater_counts(model, processor, view, [s.question for s in samples]),
                                       strict=True):
                    r[f"{name}_raters"], r[f"{name}_content_raters"] = nr, nc
            for r in rec:
                if checked[name] < check:
                    plain = answer_generate(model, processor, view, r["question"])
                    if plain != r[f"{name}_pred"]:
                        raise SystemExit(f"check failed ({name}, picture {k}): cached {r[f'{name}_pred']!r}, "
                                         f"generate {plain!r} for {r['question']!r}")
                    checked[name] += 1
        records += rec
        if log_every and (j + 1) % log_every == 0:
            accs = "  ".join(f"{m} {sum(r[m] for r in records) / len(records):.3f}" for m in models)
            print(f"  {len(records)}/{n} questions, {j + 1} pictures: {accs}", flush=True)
            if partial is not None:  # what is done so far, in case the run is stopped
                partial.write_text(json.dumps({"world": world, "n": len(records), "partial": True,
                                               "records": records}) + "\n")
    result = {"world": world, "n": len(records), "pictures": j + 1, "checked_against_generate": checked,
              "models": {name: summarise(records, name) for name in models},
              "seconds": {k: round(v, 1) for k, v in seconds.items()}}
    if raters:
        for name in models:
            share, half = ratio_with_error([r[f"{name}_content_raters"] for r in records],
                                           [r[f"{name}_raters"] for r in records])
            result["models"][name]["content_raters"] = {"share": share, "ci95": [share - half, share + half]}
    names = list(models)
    if len(names) == 2:
        result["difference"] = {f"{names[0]} - {names[1]}": paired_difference(records, names[0], names[1])}
    result["records"] = records
    return result


def table(result: dict) -> str:
    names = list(result["models"])
    lines = [f"{result['world']} world, {result['n']} questions on {result['pictures']} pictures",
             f"{'family':<10}" + "".join(f"{m[:28]:>34}" for m in names)]
    for f in (*FAMILIES, "overall"):
        cells = []
        for m in names:
            r = result["models"][m].get(f)
            cells.append("" if r is None else
                         f"{r['correct']}/{r['total']} {100 * r['accuracy']:.1f}% [{100 * r['ci95'][0]:.1f}, "
                         f"{100 * r['ci95'][1]:.1f}]")
        lines.append(f"{f:<10}" + "".join(f"{c:>34}" for c in cells))
    for size in result["models"][names[0]]["by_size"]:
        cells = [f"{r['correct']}/{r['total']} {100 * r['accuracy']:.1f}%"
                 for r in (result["models"][m]["by_size"][size] for m in names)]
        lines.append(f"{size:<10}" + "".join(f"{c:>34}" for c in cells))
    for m in names:
        if (c := result["models"][m].get("content_raters")) is not None:
            lines.append(f"{m}: raters that are content words {100 * c['share']:.1f}% [{100 * c['ci95'][0]:.1f}, "
                         f"{100 * c['ci95'][1]:.1f}]")
    for k, d in result.get("difference", {}).items():
        lines.append(f"{k}: {100 * d['difference']:+.1f} points [{100 * d['ci95'][0]:+.1f}, "
                     f"{100 * d['ci95'][1]:+.1f}] on {d['questions']} paired questions")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a scenes model folder (LLaVA-NeXT or LLaVA-1.5)")
    p.add_argument("--baseline", default=None, help="a second model answered on the same questions")
    p.add_argument("--world", default="own", choices=WORLDS)
    p.add_argument("--n", type=int, default=3000, help="held-out questions")
    p.add_argument("--check", type=int, default=0, help="re-answer the first K questions with plain generate")
    p.add_argument("--raters", action="store_true", help="also measure the share of content-word raters")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="also write the result (with every answer) here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    models = {"model": load(args.model)}
    if args.baseline:
        models["baseline"] = load(args.baseline)
    partial = Path(args.json + ".partial") if args.json else None
    result = evaluate(models, args.n, args.world, check=args.check, raters=args.raters, partial=partial)
    result["model"] = args.model
    result["baseline"] = args.baseline
    print(f"model: {args.model}" + (f"; baseline: {args.baseline}" if args.baseline else ""))
    print(table(result))
    print(f"seconds: {result['seconds']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        partial.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
