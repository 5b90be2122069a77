"""Command line: `python -m sparsevlm {run,cost,models,methods,bench,eval}`.

Bad arguments exit non-zero with one line."""

from __future__ import annotations

import argparse
import json
import sys

from .config import ACCOUNTINGS, PruneConfig
from .errors import SparseVLMError
from .methods import METHODS

# scenes.worlds.ALL_WORLDS, named here so that building the parser draws no scene module (a test keeps them equal)
EVAL_WORLDS = ("v2", "independent", "hires", "independent-hires")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a whole number") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be at least 1")
    return v


def option_flags() -> dict[str, list[tuple[str, object]]]:
    """flag -> [(method, Option)] for every option a registered method declares (methods/<name>.py `options`),
    keyed by the option's own flag (methods sharing an option name share its flag)."""
    from .methods import get_method

    out: dict[str, list[tuple[str, object]]] = {}
    for name in METHODS:
        for o in get_method(name).options:
            out.setdefault(o.flag, []).append((name, o))
    return out


def add_option_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per option name (with its aliases), generated from the methods' declarations. A flag is read for
    the chosen --method (ZipVL's --tau is its attention-mass threshold, SparseVLM's its recycling share); a flag
    the chosen method does not have is an error. Values are checked by the method's own Option."""
    g = parser.add_argument_group("method options (read for the chosen --method; `python -m sparsevlm methods` "
                                  "lists them)")
    for flag, owners in option_flags().items():
        dest = "opt_" + owners[0][1].name
        aliases = sorted({a for _, o in owners for a in o.aliases})
        text = "; ".join(f"{m}: {o.help} [{o.range_text()}; default {o.default}]" for m, o in owners)
        g.add_argument(flag, *aliases, dest=dest, default=None, metavar="VALUE", help=text)
        if any(o.kind == "bool" for _, o in owners):
            g.add_argument("--no-" + flag[2:], dest=dest, action="store_const", const="false", help=f"{flag} false")


def chosen_options(a: argparse.Namespace) -> dict:
    """The option flags given on the command line, by option name (checked later for the chosen method)."""
    return {k[4:]: v for k, v in vars(a).items() if k.startswith("opt_") and v is not None}


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m sparsevlm", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    r = sub.add_parser("run", help="answer a question about an image with pruning, print the trace summary")
    r.add_argument("--model", default=None, help="local folder or hub id (default: the embedded model)")
    r.add_argument("--image", required=True)
    r.add_argument("--question", required=True)
    r.add_argument("--method", default="sparsevlm", choices=METHODS)
    r.add_argument("--budget", type=_positive_int, default=64,
                   help="visual tokens (LLaVA-1.5: 192/128/96/64; LLaVA-NeXT: 640/320/160)")
    r.add_argument("--accounting", default="paper", choices=ACCOUNTINGS,
                   help="paper: each method's published setting and counting; flops: every method at the same "
                        "input-counted equal tokens (same prefill cost)")
    r.add_argument("--positions", default=None, choices=("keep", "compact"),
                   help="position ids of survivors (default: the method's own)")
    r.add_argument("--seed", type=int, default=0, help="random draws (random baseline, clustering noise, probes)")
    add_option_flags(r)
    r.add_argument("--max-new-tokens", type=_positive_int, default=16)
    r.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    r.add_argument("--device", default=None)
    r.add_argument("--dtype", default=None)
    r.add_argument("--json", action="store_true", help="print one JSON object")
    r.add_argument("--trace-out", default=None, help="write the full trace JSON to this file")

    c = sub.add_parser("cost", help="analytic FLOPs and KV-cache calculator (no weights needed)")
    c.add_argument("--preset", default="llava-1.5-7b", help="llava-1.5-7b, llava-1.5-13b, ... or a config.json")
    c.add_argument("--visual-tokens", type=_positive_int, default=576)
    c.add_argument("--text-tokens", type=_positive_int, default=34)
    c.add_argument("--prefix-tokens", type=int, default=0)
    c.add_argument("--pruned-to", type=_positive_int, default=None, help="visual tokens in every layer after pruning")
    c.add_argument("--bytes", type=int, default=2, help="bytes per cached value (2 = fp16)")
    c.add_argument("--attended-share", type=float, default=None,
                   help="ZipVL-style sparse attention: this share of the tokens attends at every layer; prints, per "
                        "sequence length, attention's share of the FLOPs and the FLOPs and KV cache with and without")
    c.add_argument("--lengths", default="650,2900,8192,32768",
                   help="prefill lengths for --attended-share (comma-separated tokens)")
    c.add_argument("--probe-rows", type=int, default=128, help="probe rows scoring every key (--attended-share)")
    c.add_argument("--json", action="store_true")

    m = sub.add_parser("models", aliases=["presets"],
                       help="the model presets: grid, depth, parameters, memory, methods, hardware")
    m.add_argument("--json", action="store_true")

    t = sub.add_parser("methods", help="the registered pruning methods: what ranks the tokens, [CLS], positions")
    t.add_argument("--json", action="store_true")
    t.add_argument("--markdown", action="store_true", help="a Markdown table (the README's method table)")

    b = sub.add_parser("bench", help="prefill latency of every method, side by side")
    b.add_argument("--width", default=None, choices=("cpu", "7b", "tiny"),
                   help="default: 7b on CUDA, cpu otherwise; tiny: a seconds-long dry run of the code path")
    b.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA when present)")
    b.add_argument("--runs", type=_positive_int, default=5)
    b.add_argument("--warmup", type=int, default=2)
    b.add_argument("--accounting", default="both", choices=(*ACCOUNTINGS, "both"))
    b.add_argument("--methods", default=None, help="comma-separated methods (default: every registered method)")
    b.add_argument("--visual", default="576", choices=("576", "long", "next"),
                   help="576: LLaVA-1.5's 24x24 grid; long: one 54x54 grid of 2,916 visual tokens (about LLaVA-NeXT's "
                        "length; cpu and tiny widths); next: LLaVA-NeXT itself (with --width 7b, LLaVA-NeXT-7B's "
                        "full shape), a 672x672 picture = 2,928 visual tokens, every method at 320")
    b.add_argument("--json", action="store_true")
    b.add_argument("--out", default=None, help="also write the result JSON to this file")

    e = sub.add_parser("eval", help="accuracy and evidence recall of every method on generated scenes")
    e.add_argument("--model", default=None)
    e.add_argument("--n", type=_positive_int, default=300, help="questions")
    e.add_argument("--world", default=None, choices=EVAL_WORLDS,
                   help="whose held-out scenes (default: the model's own, training_state.json 'world'; "
                        "v2 for a folder that records none)")
    e.add_argument("--seed", type=int, default=None,
                   help="held-out seed (default: 12345 in the 336 px worlds; in the high-resolution worlds their own "
                        "held-out set, the questions training.evaluate_next asks)")
    e.add_argument("--methods", default=None,
                   help="comma-separated subset of the benchmark's configurations (METHOD-BUDGET-ACCOUNTING at the "
                        "loaded model's budgets: 192/128/96/64 on LLaVA-1.5, 640/320/160 on LLaVA-NeXT)")
    e.add_argument("--accounting", default="both", choices=(*ACCOUNTINGS, "both"))
    e.add_argument("--json", action="store_true")
    e.add_argument("--out", default=None, help="folder for benchmark.md, benchmark.json and the figure")
    return p


def cmd_run(a) -> int:
    from .images import load_image
    from .loading import DEFAULT_MODEL, load_model
    from .pipeline import check_question, run
    from .vocab import unknown_words, unknown_words_notice

    image = load_image(a.image)
    check_question(a.question)
    cfg = PruneConfig(method=a.method, budget=a.budget, accounting=a.accounting, positions=a.positions, seed=a.seed,
                      options=chosen_options(a)).validate()
    lm = load_model(a.model or DEFAULT_MODEL, device=a.device, dtype=a.dtype)
    cfg.validate(lm.visual_tokens)  # a bad budget is the one error line, before the word notice
    unknown = unknown_words(a.question, lm.processor.tokenizer)
    if unknown:  # before the run (on stderr, so --json stays one object): why an answer may be off
        print(unknown_words_notice(unknown), file=sys.stderr, flush=True)
    result = run(lm, image, a.question, cfg, max_new_tokens=a.max_new_tokens, do_sample=a.sample)
    t = result.trace
    if a.trace_out:
        with open(a.trace_out, "w") as f:
            f.write(t.to_json(indent=1))
    if a.json:
        # with the per-patch attention, and the layout that places each visual token on the picture
        print(json.dumps({**t.summary(), "attention_profile": t.attention_profile, "layout": t.layout,
                          "unknown_words": [{"word": w, "suggestion": s} for w, s in unknown]}))
        return 0
    s = t.summary()
    print(f"answer: {t.answer}")
    if s["budget_met"] is None and t.cost.budget_note:  # a method whose own rule sets the counts (ZipVL)
        print(f"method: {t.method} ({t.cost.budget_note})")
    else:
        met = {True: "met", False: "NOT met", None: "no budget"}[s["budget_met"]]
        print(f"method: {t.method} (budget {a.budget}, {s['accounting']} accounting: {met} by "
              f"{s['budget_counting']} counting), equal tokens {s['equal_tokens_input']:.1f} counted at layer "
              f"inputs, {s['equal_tokens_output']:.1f} counted at pruning layers' outputs")
    if t.attention:
        print("attending per layer (p; visual of " + f"{t.visual_tokens}): "
              + " ".join(f"{x.layer}:{x.p}/{x.visual}" for x in t.attention))
        full = [x.extras["full"] for x in t.attention if "full" in x.extras]
        if full:
            print(f"probe rows against full attention: recall {sum(f['recall'] for f in full) / len(full):.3f}, "
                  f"Jaccard {sum(f['jaccard'] for f in full) / len(full):.3f} (mean over layers)")
    if t.raters:
        print("raters: " + " ".join(f"[{r.token} {r.score:.3f}]" if r.rater else r.token for r in t.raters))
    for st in t.stages:
        where = "before the LLM" if st.after_layer < 0 else f"after layer {st.after_layer}"
        print(f"  {where}: {st.visual_in} -> {st.visual_out} visual tokens, rank(P)={st.rank}, deleted "
              f"{st.deleted}, recycled {st.recycled} into {st.clusters} clusters | {st.formula}")
    tm, c = t.timings_ms, t.cost
    print(f"measured: vision {tm.vision:.1f} ms, prefill {tm.prefill:.1f} ms (LLM {tm.llm_prefill:.1f} ms), pruning "
          f"overhead {tm.prune_overhead:.2f} ms, decode {tm.decode_per_token:.1f} ms/token, total {tm.total:.1f} ms")
    print(f"computed: prefill {c.prefill_flops / 1e9:.2f} GFLOPs (dense {c.prefill_flops_dense / 1e9:.2f}), KV cache "
          f"{c.kv_bytes / 2**20:.2f} MiB (dense {c.kv_bytes_dense / 2**20:.2f})")
    m = t.memory
    if m.kv_bytes_prefill is not None:
        peak = f"{m.peak_gpu_bytes / 2**20:.1f} MiB" if m.peak_gpu_bytes is not None else m.peak_gpu_note
        print(f"measured: KV cache {m.kv_bytes_prefill / 2**20:.2f} MiB after prefill, {m.kv_bytes_final / 2**20:.2f} "
              f"MiB after decoding; peak GPU memory {peak}")
    return 0


def cmd_cost(a) -> int:
    from .cost import calculator, resolve_shape, sparse_attention_table
    from .errors import ConfigError

    shape = resolve_shape(a.preset)
    out = calculator(shape, a.visual_tokens, a.text_tokens, a.prefix_tokens, a.pruned_to, a.bytes)
    out["preset"] = a.preset
    if a.attended_share is not None:
        if not 0.0 < a.attended_share <= 1.0:
            raise ConfigError(f"--attended-share must lie in (0, 1], not {a.attended_share}")
        try:
            lengths = [int(x) for x in a.lengths.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"--lengths must be whole numbers of tokens, such as 650,2900, not {a.lengths!r}") \
                from None
        if not lengths or min(lengths) < 1 or a.probe_rows < 0:
            raise ConfigError("--lengths must be positive token counts and --probe-rows at least 0")
        out["sparse_attention"] = sparse_attention_table(shape, lengths, a.attended_share, a.probe_rows, a.bytes)
    if a.json:
        print(json.dumps(out))
        return 0
    print(f"{a.preset}: {out['decoder']}")
    tflops = out["prefill_flops"] / 1e12
    print(f"prefill with {a.visual_tokens} visual + {a.text_tokens} text tokens: {tflops:.3f} TFLOPs")
    print(f"KV cache: {out['kv_bytes'] / 2**20:.1f} MiB, of which visual {out['visual_kv_bytes'] / 2**20:.1f} MiB")
    if a.pruned_to:
        print(f"pruned to {a.pruned_to}: {out['pruned_prefill_flops'] / 1e12:.3f} TFLOPs, visual KV "
              f"{out['pruned_visual_kv_bytes'] / 2**20:.1f} MiB")
    for r in out.get("sparse_attention", []):
        print(f"{r['tokens']:>6} tokens: attention is {100 * r['attention_share']:.1f}% of the dense prefill "
              f"({r['prefill_flops_dense'] / 1e12:.2f} TFLOPs); {r['attended']} attending at every layer: "
              f"{r['prefill_flops_sparse'] / 1e12:.2f} TFLOPs ({r['flops_ratio']:.3f}x, probes included), KV cache "
              f"{r['kv_bytes_sparse'] / 2**20:,.0f} MiB instead of {r['kv_bytes_dense'] / 2**20:,.0f} MiB")
    print(f"({out['attention_counting']})")
    return 0


def cmd_models(a) -> int:
    from .loading import available_local_models
    from .presets import format_models, models_table

    rows = models_table()
    if a.json:
        print(json.dumps({"presets": rows, "available_locally": available_local_models()}))
        return 0
    print(format_models(rows))
    print("available locally (no network needed): " + ", ".join(available_local_models()))
    return 0


def methods_table() -> list[dict]:
    """One row per registered method, from what each method class declares."""
    from .methods import get_method

    return [{"name": m.name, "label": m.label, "ranks_by": m.ranks_by, "needs_cls": m.needs_cls,
             "captures": sorted(m.captures), "positions": m.default_positions, "paper_counting": m.paper_counting,
             "options": [{"name": o.name, "flag": o.flag, "default": o.plain(o.default), "range": o.range_text(),
                          "help": o.help} for o in m.options]}
            for m in (get_method(name) for name in METHODS)]


def cmd_methods(a) -> int:
    rows = methods_table()
    if a.json:
        print(json.dumps(rows))
        return 0
    if a.markdown:
        print("| method | `--method` | ranks the visual tokens by | needs [CLS] | positions | paper accounting |")
        print("| --- | --- | --- | --- | --- | --- |")
        for r in rows:
            print(f"| {r['label']} | `{r['name']}` | {r['ranks_by'] or '-'} | {'yes' if r['needs_cls'] else 'no'} | "
                  f"{r['positions']} | {r['paper_counting']} |")
        return 0
    width = max(len(r["name"]) for r in rows) + 2
    for r in rows:
        cls = ", needs [CLS]" if r["needs_cls"] else ""
        print(f"{r['name']:<{width}}{r['label']}: {r['ranks_by'] or '-'}{cls}; positions {r['positions']}")
        for o in r["options"]:
            print(f"{'':<{width}}  {o['flag']} [{o['range']}; default {o['default']}]: {o['help']}")
    return 0


def cmd_bench(a) -> int:
    import torch

    from .bench import bench, format_table
    from .methods import get_method

    width = a.width or ("7b" if torch.cuda.is_available() and a.device in (None, "cuda") else "cpu")
    accountings = ACCOUNTINGS if a.accounting == "both" else (a.accounting,)
    methods = tuple(m.strip() for m in a.methods.split(",") if m.strip()) if a.methods else None
    for m in methods or ():
        get_method(m)  # an unknown name is one error line
    result = bench(width=width, runs=a.runs, warmup=a.warmup, device=a.device, accountings=accountings,
                   methods=methods, visual=a.visual)
    if a.out:
        with open(a.out, "w") as f:
            f.write(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result) if a.json else format_table(result))
    return 0


def cmd_eval(a) -> int:
    from .evaluate import main as eval_main

    return eval_main(a)


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        commands = {"run": cmd_run, "cost": cmd_cost, "models": cmd_models, "presets": cmd_models,
                    "methods": cmd_methods, "bench": cmd_bench, "eval": cmd_eval}
        return commands[a.command](a)
    except SparseVLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
