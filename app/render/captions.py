"""The sentences around the pictures: what a layer processes, the answers beside dense's, which budget was met,
the text raters as highlighted tokens, and the notices (an empty answer explained, words the model does not
know)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sparsevlm.trace import PruneTrace

from .layers import attended_patches, attention_at, layer_counts, num_layers, token_attention
from .words import config_option, display_token, esc, method_name, normalise


def attention_caption(trace: PruneTrace, layer: int) -> str:
    """What a layer of an attention-deciding run (ZipVL) does: how many took part in attention, and how many of
    the patches left out at the layer before came back."""
    a = attention_at(trace, layer)
    total = trace.visual_tokens
    here = set(attended_patches(trace, layer) or [])
    tau = a.extras.get("tau") if a else None
    head = (f"**Decoder layer {layer}** (of {num_layers(trace)}): **{len(here)}** of {total} visual tokens took part "
            f"in attention (clear); the other {total - len(here)} (blue) skipped it here")
    rule = f" - p = {a.p} of the {a.n} tokens hold τ = {tau:g} of the probe attention mass" if a and tau else ""
    text = (f"{head}{rule}. Every token stays in the residual stream and goes through the MLP; the skipped ones leave "
            "this layer's KV cache.")
    before = attended_patches(trace, layer - 1) if layer > 0 else None
    if before is not None:
        back = len(here - set(before))
        text += (f" A patch left out at one layer can come back at the next: {back} of the patches left out at layer "
                 f"{layer - 1} attend again here.")
    else:
        text += " A patch left out at one layer can come back at the next: the set is chosen again at every layer."
    return text


def layer_caption(trace: PruneTrace, layer: int) -> str:
    if trace.attention and trace.stage_for_layer(layer) is None and attention_at(trace, layer) is not None:
        return attention_caption(trace, layer)
    c = layer_counts(trace, layer)
    total = trace.visual_tokens
    head = f"**Decoder layer {layer}** (of {num_layers(trace)}) processes **{c['tokens']}** of {total} visual tokens"
    if c["tokens"] == total and trace.stage_for_layer(layer) is None:
        nxt = next((s for s in trace.stages if s.after_layer >= layer), None)
        tail = f"nothing pruned yet; the first cut comes after layer {nxt.after_layer}." if nxt else "no pruning."
        if nxt is not None and nxt.after_layer < 0:
            tail = "pruned before the language model."
        return f"{head}: {tail}"
    parts = [f"{c['kept']} kept"]
    if c["clusters"]:
        parts.append(f"{c['clusters']} recycled tokens standing for {c['covered']} deleted patches")
    return f"{head}: " + ", ".join(parts) + "."


def rater_highlights(trace: PruneTrace) -> list[tuple[str, float | None]]:
    """Tokens after the image with a value in [-1, 1] for gr.HighlightedText's score mode.

    The value is the score's distance from the mean score, so raters (R > mean) come out red and the rest
    purple: the colour IS the rater rule, and its strength is how far above or below the mean a token lies.
    """
    if not trace.raters:
        return []
    scores = np.array([r.score for r in trace.raters], dtype=np.float64)
    mean = float(scores.mean())
    span = float(np.abs(scores - mean).max()) or 1.0
    out: list[tuple[str, float | None]] = []
    for r in trace.raters:
        v = (r.score - mean) / span
        if r.rater:
            v = max(v, 0.08)  # raters are always visibly red (the ">=" rule can put one at the mean)
        else:
            v = min(v, -0.08)
        out.append((display_token(r.token), round(float(v), 3)))
    return out


def token_attention_note(trace: PruneTrace, token: int) -> str:
    rater = next((r for r in trace.raters if r.index == token), None)
    word = esc(display_token(rater.token).strip()) if rater else str(token)
    stages = token_attention(trace, token)
    if not stages:
        return (f"{method_name(trace)} records no per-word attention rows: switch the method to SparseVLM to see each "
                "rater's own attention.")
    used = sum(v is not None for _, v in stages)
    if not used:
        return (f"“{word}” is not a text rater: its attention row played no part in what was pruned. Click a red "
                "token.")
    return (f"“{word}” is a text rater: its own attention over the patches at each of the {used} pruning steps "
            "(brighter = more attention; these rows, averaged, are the significance scores).")


def answer_markdown(pruned: PruneTrace, dense: PruneTrace | None) -> str:
    a = pruned.answer.strip() or "(empty answer)"
    if dense is None or pruned.method == "dense":
        return f"### {a}\n\n{method_name(pruned)}, {pruned.visual_tokens} visual tokens."
    d = dense.answer.strip() or "(empty answer)"
    agree = normalise(a) == normalise(d)
    badge = ('<span class="sv-badge sv-agree">✓ same answer as dense</span>' if agree else
             '<span class="sv-badge sv-differ">≠ differs from dense</span>')
    return (
        f"<div class='sv-answers'><div class='sv-answer'><div class='sv-k'>{method_name(pruned)} · "
        f"{esc(budget_line(pruned))}</div><div class='sv-v'>{esc(a)}</div></div>"
        f"<div class='sv-answer sv-dense'><div class='sv-k'>Dense · {dense.visual_tokens} tokens</div>"
        f"<div class='sv-v'>{esc(d)}</div></div></div>{badge}"
    )


def answers_agree(pruned: PruneTrace, dense: PruneTrace) -> bool:
    return normalise(pruned.answer) == normalise(dense.answer)


def budget_line(trace: PruneTrace) -> str:
    """Which accounting met the budget, in which counting: "budget 64, paper accounting: output-counted 64.8"."""
    c = trace.cost
    if c.budget_note:  # a method without a budget says what its own rule amounted to (ZipVL: τ -> attended tokens)
        return c.budget_note
    if c.budget is None or c.budget_figure is None:
        return f"{c.equal_tokens:.0f} equal tokens (no budget: {'dense' if trace.method == 'dense' else 'adaptive'})"
    counted = {"input": "input-counted", "output": "output-counted", "kept": "tokens kept",
               "attended": "visual tokens attended per layer",
               "flops": "prefill FLOPs as equal tokens"}.get(c.budget_counting, c.budget_counting)
    met = "met" if c.budget_met else "NOT met"
    fitted = ", τ fitted to the budget" if config_option(trace, "fit") == "budget" else ""
    return f"budget {c.budget} {met} by {c.accounting} accounting{fitted} ({counted} {c.budget_figure:.1f})"


def empty_answer_note(trace: PruneTrace) -> str:
    """Why an answer came out empty, when the trace shows the cause ('' otherwise): the method handed the language
    model the vision tower's [CLS] token (a merged token at no patch, VisionZip's dominant set). LLaVA trains its
    projector and language model on patch tokens only ([CLS] is dropped), so that token is out of distribution
    for the model; the small embedded model can answer nothing at all after it."""
    if trace.answer.strip() or not any(m.center < 0 for st in trace.stages for m in st.merged):
        return ""
    return (f"<div class='sv-unknown'>{method_name(trace)} answered with an empty string on this model. It hands the "
            "language model the vision tower's [CLS] token as a visual token, and this model never saw that token "
            "in training (LLaVA feeds its projector patch tokens only): the [CLS] embedding is out of distribution "
            "here, and the answer stops at once. The other methods hand over patch tokens only.</div>")


def unknown_words_html(unknown: Sequence[tuple[str, str | None]]) -> str:
    """The vocabulary hint above the results ('' when the model knows every word)."""
    if not unknown:
        return ""
    parts = [f"<b>{esc(w)}</b>" + (f" (did you mean <b>{esc(s)}</b>?)" if s else "") for w, s in unknown]
    noun = "word" if len(unknown) == 1 else "words"
    return (f"<div class='sv-unknown'>The model does not know the {noun} {', '.join(parts)}: its tokenizer reads "
            f"{'it' if len(unknown) == 1 else 'them'} as &lt;unk&gt;, so the answer may be wrong. The run still "
            "happens.</div>")
