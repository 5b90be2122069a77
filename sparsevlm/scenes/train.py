"""Train scenes-llava from scratch on generated scenes; resumable, seeded, logs curves to JSONL.

    python -m sparsevlm.scenes.train --out checkpoints/scenes-llava            # train (resumes if a checkpoint exists)
    python -m sparsevlm.scenes.train --out checkpoints/scenes-llava --export assets/models/scenes-llava

Each sequence holds one picture and many question/answer turns (the LLaVA multi-turn chat format); the loss is
on answer tokens (and the end-of-turn token) only, so each picture's 576 visual tokens pay for many answers.
Scenes grow from few objects to many as training goes (curriculum). The data stream is a pure function of
(seed, step), so a resumed run sees the same data an uninterrupted run would.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .generator import (
    COLOURS,
    FAMILIES,
    GRID,
    LABEL_CHARS,
    MAX_OBJECTS,
    SHAPES,
    heldout_set,
    patch_targets,
    render,
    training_scene,
)
from .model import (
    ModelSize,
    build_model,
    build_processor,
    pixel_values,
    scenes_tokenizer,
)

N_VISUAL = GRID * GRID


def max_objects_at(step: int, start: int, every: int) -> int:
    """Curriculum: the largest object count of a training scene at `step`."""
    return min(MAX_OBJECTS, start + step // every)


class Batcher:
    """Builds multi-turn training batches: input ids, labels (answers only) and the family of each label."""

    def __init__(self, tokenizer, n_turns: int):
        self.tok = tokenizer
        self.n_turns = n_turns
        self.image_id = tokenizer.convert_tokens_to_ids("<image>")
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id

    @functools.lru_cache(maxsize=100_000)  # noqa: B019 - one Batcher per process
    def _ids(self, text: str) -> tuple[int, ...]:
        return tuple(self.tok(text, add_special_tokens=False)["input_ids"])

    def sequence(self, samples) -> tuple[list[int], list[int], list[int]]:
        ids: list[int] = []
        labels: list[int] = []
        fams: list[int] = []
        for t, s in enumerate(samples):
            if t == 0:
                head = self._ids("USER:") + (self.image_id,) * N_VISUAL + self._ids(f"{s.question} ASSISTANT:")
            else:
                head = self._ids(f"USER: {s.question} ASSISTANT:")
            ans = self._ids(s.answer) + (self.eos,)
            ids += [*head, *ans]
            labels += [-100] * len(head) + list(ans)
            fams += [-1] * len(head) + [FAMILIES.index(s.family)] * len(ans)
        return ids, labels, fams

    def batch(self, seeds: list[int], max_objects: int, weights: dict[str, float]):
        images, seqs, targets = [], [], []
        for seed in seeds:
            scene, samples = training_scene(seed, self.n_turns, max_objects, weights)
            images.append(render(scene))
            seqs.append(self.sequence(samples))
            targets.append(torch.from_numpy(patch_targets(scene)))
        length = max(len(s[0]) for s in seqs)
        ids = torch.full((len(seqs), length), self.pad, dtype=torch.long)
        labels = torch.full((len(seqs), length), -100, dtype=torch.long)
        fams = torch.full((len(seqs), length), -1, dtype=torch.long)
        mask = torch.zeros((len(seqs), length), dtype=torch.long)
        for b, (i, lab, f) in enumerate(seqs):
            ids[b, : len(i)] = torch.tensor(i)
            labels[b, : len(i)] = torch.tensor(lab)
            fams[b, : len(i)] = torch.tensor(f)
            mask[b, : len(i)] = 1
        return ids, mask, pixel_values(images), labels, fams, torch.stack(targets)


class PatchHeads(torch.nn.Module):
    """Auxiliary training heads on the vision features LLaVA reads (penultimate CLIP layer, [CLS] dropped).

    They classify each patch's colour, shape, label character and whether it is an object's centre. The labels
    are free (the generator knows every pixel) and give the vision tower 576 targets per picture instead of a
    few answers, so it finds the visual signal early. They are dropped at export: the shipped model is a plain
    LlavaForConditionalGeneration.
    """

    sizes = (len(COLOURS) + 2, len(SHAPES) + 2, len(LABEL_CHARS) + 1, 2)

    def __init__(self, model, vision_hidden: int):
        super().__init__()
        self.heads = torch.nn.ModuleList(torch.nn.Linear(vision_hidden, n) for n in self.sizes)
        self.features = None
        layer = model.model.vision_tower.encoder.layers[model.config.vision_feature_layer]
        layer.register_forward_hook(self._keep)
        self.register_buffer("centre_weight", torch.tensor([1.0, 5.0]))

    def _keep(self, module, inputs, output):
        self.features = output[0] if isinstance(output, tuple) else output

    def loss(self, targets: torch.Tensor) -> torch.Tensor:
        feats = self.features[:, 1:]  # drop [CLS], as the "default" strategy does
        losses = []
        for k, head in enumerate(self.heads):
            w = self.centre_weight if k == 3 else None
            losses.append(F.cross_entropy(head(feats).flatten(0, 1), targets[:, k].flatten(), weight=w))
        self.features = None
        return torch.stack(losses).mean()


def answer_loss(model, ids, mask, pixels, labels, fams, eos: int):
    """Mean cross-entropy over answer tokens, plus per-family (correct, total) of the answer words."""
    # Right padding + causal attention: real tokens never see the pads, so no mask is needed, and without one
    # SDPA takes its fused causal kernel (about twice as fast here as the masked path).
    del mask
    logits = model(input_ids=ids, pixel_values=pixels).logits
    logits, labels, fams = logits[:, :-1], labels[:, 1:], fams[:, 1:]
    sel = labels != -100
    loss = F.cross_entropy(logits[sel].float(), labels[sel])
    pred = logits.argmax(-1)
    stats = {}
    with torch.no_grad():
        for k, fam in enumerate(FAMILIES):
            m = sel & (fams == k) & (labels != eos)
            if m.any():
                stats[fam] = (int((pred[m] == labels[m]).sum()), int(m.sum()))
    return loss, stats


@torch.no_grad()
def heldout_accuracy(model, batcher: Batcher, data, batch_size: int = 16) -> dict[str, float]:
    """Teacher-forced exact match of the whole answer (word + end token) on single-turn held-out questions."""
    model.eval()
    correct = {f: 0 for f in FAMILIES}
    total = {f: 0 for f in FAMILIES}
    for start in range(0, len(data), batch_size):
        chunk = data[start : start + batch_size]
        seqs = [batcher.sequence([s]) for _, s in chunk]
        length = max(len(s[0]) for s in seqs)
        ids = torch.full((len(seqs), length), batcher.pad, dtype=torch.long)
        labels = torch.full((len(seqs), length), -100, dtype=torch.long)
        mask = torch.zeros((len(seqs), length), dtype=torch.long)
        for b, (i, lab, _) in enumerate(seqs):
            ids[b, : len(i)] = torch.tensor(i)
            labels[b, : len(i)] = torch.tensor(lab)
            mask[b, : len(i)] = 1
        logits = model(input_ids=ids, pixel_values=pixel_values([im for im, _ in chunk])).logits  # right-padded
        pred = logits[:, :-1].argmax(-1)
        lab = labels[:, 1:]
        ok = ((pred == lab) | (lab == -100)).all(dim=1)
        for b, (_, s) in enumerate(chunk):
            correct[s.family] += int(ok[b])
            total[s.family] += 1
    model.train()
    acc = {f: correct[f] / total[f] for f in FAMILIES if total[f]}
    acc["overall"] = sum(correct.values()) / max(1, sum(total.values()))
    return acc


def export(ckpt_dir: Path, dest: Path) -> None:
    """Write the checkpoint as a from_pretrained-loadable model + processor (safetensors) at `dest`."""
    state = torch.load(ckpt_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    tokenizer = scenes_tokenizer()
    model = build_model(ModelSize(**state["size"]), tokenizer)
    model.load_state_dict(state["model"])
    model.eval()
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    build_processor(tokenizer).save_pretrained(dest)
    if (ckpt_dir / "log.jsonl").exists():
        shutil.copy(ckpt_dir / "log.jsonl", dest / "training_log.jsonl")
    info = {k: state[k] for k in ("step", "train_seconds", "args", "size")}
    (dest / "training_state.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"exported step {state['step']} to {dest}")


def exported_state(folder: Path) -> dict:
    """A resumable state from an exported model folder (no optimizer or aux-head state: those start fresh).

    For a machine without checkpoints/: the exported weights are committed, the checkpoint is not.
    """
    from transformers import LlavaForConditionalGeneration

    info = json.loads((folder / "training_state.json").read_text())
    model = LlavaForConditionalGeneration.from_pretrained(str(folder), local_files_only=True)
    return {"model": model.state_dict(), "step": info["step"], "train_seconds": info["train_seconds"],
            "size": info["size"]}


def train(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    tokenizer = scenes_tokenizer()
    state = torch.load(ckpt_path, map_location="cpu", weights_only=False) if ckpt_path.exists() else None
    if state is None and args.init_from:
        state = exported_state(Path(args.init_from))
    size = ModelSize(**state["size"]) if state else ModelSize(
        vision_hidden=args.vision_hidden,
        vision_layers=args.vision_layers,
        hidden=args.hidden,
        layers=args.layers,
        heads=args.heads,
        kv_heads=args.kv_heads,
        intermediate=args.intermediate,
    )
    model = build_model(size, tokenizer, seed=args.seed)
    model.train()
    aux = PatchHeads(model, size.vision_hidden)
    projector = [p for n, p in model.named_parameters() if "multi_modal_projector" in n]
    others = [p for n, p in model.named_parameters() if "multi_modal_projector" not in n]
    others += list(aux.parameters())
    opt = torch.optim.AdamW(
        [{"params": others, "lr_scale": 1.0}, {"params": projector, "lr_scale": args.projector_lr_scale}],
        lr=args.lr,
        betas=(0.9, 0.98),
        weight_decay=0.01,
    )
    step, train_seconds = 0, 0.0
    if state:
        model.load_state_dict(state["model"])
        if "optim" in state:
            aux.load_state_dict(state["aux"])
            opt.load_state_dict(state["optim"])
        step, train_seconds = state["step"], state["train_seconds"]
        how = "checkpoint" if "optim" in state else f"exported weights in {args.init_from} (fresh optimizer, aux heads)"
        print(f"resumed from step {step} ({train_seconds / 60:.1f} min trained) from {how}")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params / 1e6:.2f}M parameters, size {size.to_dict()}")
    batcher = Batcher(tokenizer, args.turns)
    weights = {f: 1.0 for f in FAMILIES}
    weights.update({"count": 1.5, "relation": 1.5, "read": 2.0})
    heldout = heldout_set(args.heldout_n) if args.heldout_every else []
    log = open(out / "log.jsonl", "a")  # noqa: SIM115 - open for the whole run
    last_ckpt = time.time()
    window = {"loss": 0.0, "aux": 0.0, "n": 0, "stats": {}, "t": 0.0}

    def save() -> None:
        tmp = out / "checkpoint.pt.tmp"
        torch.save(
            {
                "model": model.state_dict(),
                "aux": aux.state_dict(),
                "optim": opt.state_dict(),
                "step": step,
                "train_seconds": train_seconds,
                "size": size.to_dict(),
                "args": vars(args),
            },
            tmp,
        )
        os.replace(tmp, ckpt_path)

    end_step = step + args.steps if args.steps else math.inf
    while step < end_step:
        t0 = time.time()
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        max_obj = max_objects_at(step, args.curriculum_start, args.curriculum_every)
        seeds = [args.seed * 1_000_000 + step * args.batch + b for b in range(args.batch)]
        ids, mask, pixels, labels, fams, targets = batcher.batch(seeds, max_obj, weights)
        loss, stats = answer_loss(model, ids, mask, pixels, labels, fams, batcher.eos)
        aux_loss = aux.loss(targets)
        opt.zero_grad(set_to_none=True)
        (loss + args.aux_weight * aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        step += 1
        dt = time.time() - t0
        train_seconds += dt
        window["loss"] += float(loss.detach())
        window["aux"] += float(aux_loss.detach())
        window["n"] += 1
        window["t"] += dt
        for f, (c, n) in stats.items():
            a, b = window["stats"].get(f, (0, 0))
            window["stats"][f] = (a + c, b + n)
        if step % args.log_every == 0:
            rec = {
                "step": step,
                "loss": window["loss"] / window["n"],
                "aux_loss": window["aux"] / window["n"],
                "train_acc": {f: round(c / n, 4) for f, (c, n) in window["stats"].items()},
                "s_per_step": window["t"] / window["n"],
                "lr": lr,
                "max_objects": max_obj,
                "train_minutes": train_seconds / 60,
                "time": time.strftime("%H:%M:%S"),
            }
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print(json.dumps(rec), flush=True)
            window = {"loss": 0.0, "aux": 0.0, "n": 0, "stats": {}, "t": 0.0}
        if args.heldout_every and step % args.heldout_every == 0:
            t1 = time.time()
            acc = heldout_accuracy(model, batcher, heldout)
            rec = {"step": step, "heldout_tf": {k: round(v, 4) for k, v in acc.items()}, "n": len(heldout),
                   "eval_seconds": round(time.time() - t1, 1)}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print(json.dumps(rec), flush=True)
        if time.time() - last_ckpt > args.ckpt_minutes * 60:
            save()
            last_ckpt = time.time()
    save()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="checkpoints/scenes-llava", help="checkpoint + log folder (resumed from)")
    p.add_argument("--export", default=None, help="export the checkpoint in --out to this folder and exit")
    p.add_argument("--init-from", default=None,
                   help="with no checkpoint in --out, start from this exported model folder (e.g. the shipped one)")
    p.add_argument("--steps", type=int, default=0, help="steps to run in this invocation (0: until stopped)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--turns", type=int, default=20, help="question/answer turns per picture")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--projector-lr-scale", type=float, default=2.0)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--aux-weight", type=float, default=0.5, help="weight of the per-patch auxiliary heads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--curriculum-start", type=int, default=3)
    p.add_argument("--curriculum-every", type=int, default=25, help="steps per extra object")
    p.add_argument("--ckpt-minutes", type=float, default=10.0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--heldout-every", type=int, default=50)
    p.add_argument("--heldout-n", type=int, default=105)
    p.add_argument("--vision-hidden", type=int, default=128)
    p.add_argument("--vision-layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=256)
    args = p.parse_args()
    if args.export:
        export(Path(args.out), Path(args.export))
    else:
        train(args)


if __name__ == "__main__":
    main()
