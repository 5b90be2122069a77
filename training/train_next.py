"""Train scenes-llava-next: LLaVA-NeXT's instruction tuning on high-resolution scenes, from scenes-llava.

    OMP_NUM_THREADS=1 python -m training.train_next --out checkpoints/next --until 500 --total-steps 500
    python -m training.train_next --out checkpoints/next --export checkpoints/next-export

Rerunning the first command resumes from `OUT/checkpoint.pt` (saved every `--ckpt-minutes` and on SIGTERM) and
stops at `--until` steps; a run already there exits at once. Batches are a pure function of (seed, step), so a
resumed run sees what an uninterrupted one would. Every `--log-every` steps a line goes to `OUT/log.jsonl`.

The recipe (LLaVA-NeXT's stage 2, "visual instruction tuning" at high resolution, on the scale of this model):

- the model: `next_model.build_from` - scenes-llava's tower, projector and decoder, a new `image_newline`, anyres
  pinpoints up to 672x672 / 1008x336 / 336x1008 (a base view and at most 4 tiles);
- the data: high-resolution pictures of `sparsevlm/scenes/hires.py` (several small objects and a small label,
  at the pinpoint sizes) with `--turns` question/answer turns each, so each picture's 1,750-2,930 visual tokens
  pay for many supervised answers, and a caption turn (`hires.describe`) in `--caption-p` of them. As in the v2
  world's last phases, labels are lettered in varied typefaces and stroke hands (`world.vary_label`) and some
  backgrounds tinted (`world.vary_background`); held-out pictures are never varied;
- what trains: the decoder, the LM head, the embeddings, the projector and the newline at `--lr`; the vision
  tower at `--tower-lr-scale` of it (LLaVA-NeXT: a tenth);
- the loss: next-token cross-entropy on the answers (and their end-of-turn token) only. No auxiliary head, and
  no loss reads attention weights, [CLS] attention, the raters' similarity or any method's scores.

AdamW, linear warm-up over `--warmup` steps, then linear decay to `--lr-end` at `--total-steps`; gradients
clipped at `--clip`; `--pictures` pictures per step (gradients accumulated, one sequence at a time: no padding).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sparsevlm.scenes import hires, world
from sparsevlm.scenes.world import FAMILIES

from .model import v2_tokenizer
from .next_model import SHIPPED, build_from, build_processor

CAPTION = len(FAMILIES)
STAT_NAMES = (*FAMILIES, "caption")


def family_weights(spec: str) -> dict[str, float]:
    """Family weights for the training questions: counting, position and relation (whole-picture questions
    that need every tile) weigh more by default; `spec` overrides as "count=2,read=1"."""
    w = {f: 1.0 for f in FAMILIES}
    w.update({"count": 2.0, "position": 1.5, "relation": 1.5})
    for item in filter(None, spec.split(",")):
        name, value = item.split("=")
        if name not in w:
            raise SystemExit(f"--family-weights: unknown family {name!r} (families: {', '.join(FAMILIES)})")
        w[name] = float(value)
    return w


def conversation(seed: int, turns: int, caption_p: float, weights: dict[str, float], vary: bool = True):
    """(picture, [(question, answer, family index)]) of training picture `seed`."""
    scene, samples = hires.training_scene(seed, turns, weights)
    if vary:
        world.vary_label(scene, seed, default_share=0.4, stroke_share=0.5)
        world.vary_background(scene, seed, share=0.4)
    out = [(s.question, s.answer, FAMILIES.index(s.family)) for s in samples]
    rng = np.random.default_rng([seed, 55])
    if rng.random() < caption_p or not out:
        prompt = world.CAPTION_PROMPTS[int(rng.integers(len(world.CAPTION_PROMPTS)))]
        out.insert(int(rng.integers(len(out) + 1)), (prompt, hires.describe(scene), CAPTION))
    return hires.render(scene), out


def encode(processor, image, turns):
    """Model inputs of one conversation, as the chat template writes it ("USER: <image>\\nq ASSISTANT: a</s>USER:
    q ASSISTANT: a</s>..."), the picture expanded by the processor itself: (input_ids [1, T], pixel_values,
    image_sizes, labels [T] (-100 except on the answers' tokens, each at the position that predicts it),
    families [T])."""
    tok = processor.tokenizer
    enc = processor(images=[image], text=["USER: <image>"], return_tensors="pt")
    ids = enc["input_ids"][0].tolist()
    labels = [-100] * len(ids)
    fams = [-1] * len(ids)
    for t, (q, a, fam) in enumerate(turns):
        text = f"{q} ASSISTANT:" if t == 0 else f"USER: {q} ASSISTANT:"
        qi = tok(text, add_special_tokens=False)["input_ids"]
        ids += qi
        labels += [-100] * len(qi)
        fams += [-1] * len(qi)
        ai = [*tok(a, add_special_tokens=False)["input_ids"], tok.eos_token_id]
        for tid in ai:  # token tid is predicted at the position before it
            labels[len(ids) - 1] = tid
            fams[len(ids) - 1] = fam
            ids.append(tid)
            labels.append(-100)
            fams.append(-1)
    return (torch.tensor([ids]), enc["pixel_values"], enc["image_sizes"], torch.tensor(labels), torch.tensor(fams))


def answer_loss(logits, labels, fams):
    """Mean cross-entropy over the supervised tokens and per-family (correct, total) of their argmax."""
    sel = labels != -100
    loss = F.cross_entropy(logits[sel].float(), labels[sel])
    stats = {}
    with torch.no_grad():
        pred = logits.argmax(-1)
        for k, name in enumerate(STAT_NAMES):
            m = sel & (fams == k)
            if m.any():
                stats[name] = (int((pred[m] == labels[m]).sum()), int(m.sum()))
    return loss, stats


def lr_at(step: int, args) -> float:
    rate = args.lr * min(1.0, (step + 1) / args.warmup)
    if step >= args.warmup and args.total_steps > args.warmup:
        frac = min(1.0, (step - args.warmup) / (args.total_steps - args.warmup))
        rate = args.lr + (args.lr_end - args.lr) * frac
    return rate


def param_groups(model, args) -> list[dict]:
    """Decoder, embeddings, LM head, projector and newline at the full rate; the vision tower at
    --tower-lr-scale of it."""
    tower = [p for n, p in model.named_parameters() if "vision_tower" in n]
    rest = [p for n, p in model.named_parameters() if "vision_tower" not in n]
    groups = [{"params": rest, "lr_scale": 1.0}]
    if args.tower_lr_scale > 0:
        groups.append({"params": tower, "lr_scale": args.tower_lr_scale})
    else:
        for p in tower:
            p.requires_grad_(False)
    return groups


def train(args) -> None:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    saved = torch.load(ckpt_path, map_location="cpu", weights_only=False) if ckpt_path.exists() else None
    step0 = saved["step"] if saved is not None else 0
    if step0 >= args.until:
        print(f"already at step {step0} >= --until {args.until}: nothing to do", flush=True)
        return
    tokenizer = v2_tokenizer()
    processor = build_processor(tokenizer)
    model = build_from(args.init_from, seed=args.seed)
    if saved is not None:
        model.load_state_dict(saved["model"])
    model.train()
    opt = torch.optim.AdamW(param_groups(model, args), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    step, train_seconds = 0, 0.0
    if saved is not None:
        opt.load_state_dict(saved["optim"])
        step, train_seconds = saved["step"], saved["train_seconds"]
        print(f"resumed at step {step} ({train_seconds / 60:.1f} min) from {ckpt_path}", flush=True)
    n_train = sum(p.numel() for g in opt.param_groups for p in g["params"])
    print(f"{n_train / 1e6:.2f}M trainable parameters; {args.pictures} pictures x {args.turns} turns a step; "
          f"threads {torch.get_num_threads()}", flush=True)
    weights = family_weights(args.family_weights)
    if args.pid_file:
        Path(args.pid_file).write_text(f"{os.getpid()}\n")
    log = open(out / "log.jsonl", "a")  # noqa: SIM115 - open for the whole run

    def save() -> None:
        tmp = out / "checkpoint.pt.tmp"
        torch.save({"model": model.state_dict(), "optim": opt.state_dict(), "step": step,
                    "train_seconds": train_seconds, "args": vars(args)}, tmp)
        os.replace(tmp, ckpt_path)

    stop: list[bool] = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))  # finish the step, save, exit
    last_ckpt = time.time()
    window = {"loss": 0.0, "n": 0, "t": 0.0, "tokens": 0, "stats": {}}
    while step < args.until and not stop:
        t0 = time.time()
        lr = lr_at(step, args)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for k in range(args.pictures):
            seed = hires.HIRES_TRAIN_SEED + args.seed * 1_000_000 + step * args.pictures + k
            image, turns = conversation(seed, args.turns, args.caption_p, weights)
            ids, pixels, sizes, labels, fams = encode(processor, image, turns)
            logits = model(input_ids=ids, pixel_values=pixels, image_sizes=sizes).logits[0]
            loss, stats = answer_loss(logits, labels, fams)
            (loss / args.pictures).backward()
            loss_sum += float(loss.detach())
            window["tokens"] += ids.shape[1]
            for f, (c, n) in stats.items():
                a, b = window["stats"].get(f, (0, 0))
                window["stats"][f] = (a + c, b + n)
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], args.clip)
        opt.step()
        step += 1
        dt = time.time() - t0
        train_seconds += dt
        window["loss"] += loss_sum / args.pictures
        window["n"] += 1
        window["t"] += dt
        if step % args.log_every == 0:
            rec = {"step": step, "loss": round(window["loss"] / window["n"], 4),
                   "train_acc": {f: round(c / n, 3) for f, (c, n) in window["stats"].items()},
                   "s_per_step": round(window["t"] / window["n"], 2),
                   "tokens_per_picture": round(window["tokens"] / (window["n"] * args.pictures)),
                   "lr": lr, "train_minutes": round(train_seconds / 60, 2), "time": time.strftime("%H:%M:%S")}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print(json.dumps(rec), flush=True)
            window = {"loss": 0.0, "n": 0, "t": 0.0, "tokens": 0, "stats": {}}
        if time.time() - last_ckpt > args.ckpt_minutes * 60:
            save()
            last_ckpt = time.time()
    save()
    print(f"saved step {step} to {ckpt_path}", flush=True)


def export(ckpt_dir: Path, dest: Path, init_from: str | Path = SHIPPED) -> None:
    """A plain LlavaNextForConditionalGeneration folder (weights, config, processor, tokenizer, chat template)
    from a checkpoint, with training_state.json (step, minutes, arguments)."""
    saved = torch.load(Path(ckpt_dir) / "checkpoint.pt", map_location="cpu", weights_only=False)
    model = build_from(init_from)
    model.load_state_dict(saved["model"])
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(dest))
    tokenizer = v2_tokenizer()
    tokenizer.model_max_length = model.config.text_config.max_position_embeddings
    build_processor(tokenizer).save_pretrained(str(dest))
    state = {"world": "hires", "step": saved["step"], "train_minutes": round(saved["train_seconds"] / 60, 1),
             "args": saved["args"]}
    (dest / "training_state.json").write_text(json.dumps(state, indent=2) + "\n")
    print(f"exported step {saved['step']} to {dest}", flush=True)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="checkpoints/next")
    p.add_argument("--init-from", default=str(SHIPPED), help="the scenes-llava folder to start from")
    p.add_argument("--until", type=int, default=500, help="stop at this step (resumable)")
    p.add_argument("--total-steps", type=int, default=500, help="the lr schedule's length")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--lr-end", type=float, default=1e-5)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--tower-lr-scale", type=float, default=0.1, help="the vision tower's share of --lr")
    p.add_argument("--pictures", type=int, default=2, help="pictures per step")
    p.add_argument("--turns", type=int, default=16, help="question turns per picture")
    p.add_argument("--caption-p", type=float, default=0.25, help="share of pictures with a caption turn")
    p.add_argument("--family-weights", default="")
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ckpt-minutes", type=float, default=4.0)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--pid-file", default=None, help="write the process id here")
    p.add_argument("--export", default=None, help="export OUT's checkpoint to this folder and exit")
    return p


def main() -> None:
    args = parser().parse_args()
    if args.export:
        export(Path(args.out), Path(args.export), args.init_from)
        return
    train(args)


if __name__ == "__main__":
    main()
