"""Analytic cost accounting (docs/engine.md): prefill FLOPs, pruning overhead FLOPs, KV-cache bytes.

Conventions (stated in the UI): a multiply-add is 2 FLOPs; attention scores + values are counted as
4 n^2 d for the full n x n product (no causal halving); only the decoder layers are counted (the vision tower,
projector and LM head are the same for every method and are left out, as in FasterVLM Table 11).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError


@dataclass(frozen=True)
class DecoderShape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @classmethod
    def from_config(cls, cfg) -> DecoderShape:
        """From a transformers text config (or a LLaVA config, whose text_config is used) or a dict."""
        if hasattr(cfg, "to_dict"):
            cfg = cfg.to_dict()
        cfg = cfg.get("text_config", cfg)
        heads = cfg["num_attention_heads"]
        return cls(
            layers=cfg["num_hidden_layers"],
            hidden=cfg["hidden_size"],
            intermediate=cfg["intermediate_size"],
            heads=heads,
            kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        )


PRESETS = {
    "llava-1.5-7b": DecoderShape(layers=32, hidden=4096, intermediate=11008, heads=32, kv_heads=32, head_dim=128),
    "llava-1.5-13b": DecoderShape(layers=40, hidden=5120, intermediate=13824, heads=40, kv_heads=40, head_dim=128),
    # Qwen1.5-0.5B-Chat's decoder (the checkpoint's config.json), not Qwen2-0.5B's (896 wide, GQA 14/2).
    "llava-interleave-qwen-0.5b": DecoderShape(
        layers=24, hidden=1024, intermediate=2816, heads=16, kv_heads=16, head_dim=64
    ),
    # LLaVA-NeXT-7B: Vicuna-7B's decoder (LLaVA-1.5-7B's), and Mistral-7B-Instruct-v0.2's (GQA, 8 KV heads).
    "llava-v1.6-vicuna-7b": DecoderShape(layers=32, hidden=4096, intermediate=11008, heads=32, kv_heads=32,
                                         head_dim=128),
    "llava-v1.6-mistral-7b": DecoderShape(layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8,
                                          head_dim=128),
}


def resolve_shape(preset_or_path: str) -> DecoderShape:
    if preset_or_path in PRESETS:
        return PRESETS[preset_or_path]
    p = Path(preset_or_path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise ConfigError(
            f"unknown preset or config {preset_or_path!r}; presets: {', '.join(PRESETS)}, or a config.json path"
        )
    try:
        return DecoderShape.from_config(json.loads(p.read_text()))
    except (KeyError, ValueError) as e:
        raise ConfigError(f"{p} is not a decoder config.json ({e})") from None


def layer_flops(n: int, s: DecoderShape, attended: int | None = None) -> float:
    """One decoder layer on n tokens: projections 2nd(2d + 2d_kv), attention 4m^2 d among the m tokens that
    attend (m = n unless a method decides attention, as ZipVL does), SwiGLU FFN 6ndm."""
    d = s.hidden
    m = n if attended is None else attended
    return 2 * n * d * (2 * d + 2 * s.kv_dim) + 4 * m * m * d + 6 * n * d * s.intermediate


def prefill_flops(tokens_per_layer: list[int], s: DecoderShape, attended_per_layer: list[int] | None = None) -> float:
    attended = attended_per_layer or [None] * len(tokens_per_layer)
    return float(sum(layer_flops(n, s, m) for n, m in zip(tokens_per_layer, attended, strict=True)))


def linear_flops(n: int, s: DecoderShape) -> float:
    """The part of a layer that runs on every token whatever attends: projections and the FFN."""
    return layer_flops(n, s, 0)


def probe_flops(rows: int, n: int, s: DecoderShape) -> float:
    """Scoring keys with explicit query rows (ZipVL's probes): the rows' q·k over every key, 2 r n d (the softmax
    and the sums are not counted, as the other overheads count only products)."""
    return float(2 * rows * n * s.hidden)


def kv_bytes(tokens_per_layer: list[int], s: DecoderShape, bytes_per_value: int) -> int:
    """sum over layers of n_l * 2 (K and V) * kv_heads * head_dim * bytes."""
    return int(sum(n * 2 * s.kv_dim * bytes_per_value for n in tokens_per_layer))


def rater_flops(text: int, visual: int, s: DecoderShape) -> float:
    """Text raters, once: Lt x Lv x 2D (appendix A.2)."""
    return float(text * visual * 2 * s.hidden)


def stage_overhead_flops(
    raters: int, seq_len: int, visual: int, recycled: int, clusters: int, s: DecoderShape
) -> float:
    """One pruning stage: rater-row attention (r x n x 2D), significance (r x Lv), rank via SVD
    (r x Lv x min(r, Lv)), and recycling (appendix A.2): Lr(3Lr - 1)2D + Lr + D(Lr - C)."""
    d = s.hidden
    flops = raters * seq_len * 2 * d + raters * visual + raters * visual * min(raters, visual)
    if recycled:
        flops += recycled * (3 * recycled - 1) * 2 * d + recycled + d * (recycled - clusters)
    return float(flops)


def bytes_per_value(dtype_name: str) -> int:
    return {"float32": 4, "float16": 2, "bfloat16": 2}.get(dtype_name.replace("torch.", ""), 2)


def calculator(s: DecoderShape, visual: int, text: int, prefix: int = 0, visual_after: int | None = None,
               bytes_value: int = 2) -> dict:
    """The `cost` CLI: dense prefill and KV cache for a prompt; optionally with every layer at `visual_after`."""
    dense_layers = [prefix + visual + text] * s.layers
    out = {
        "decoder": s.__dict__,
        "visual_tokens": visual,
        "text_tokens": text,
        "prefix_tokens": prefix,
        "prefill_flops": prefill_flops(dense_layers, s),
        "kv_bytes": kv_bytes(dense_layers, s, bytes_value),
        "visual_kv_bytes": kv_bytes([visual] * s.layers, s, bytes_value),
        "bytes_per_value": bytes_value,
        "attention_counting": "full n^2 (no causal halving); decoder layers only",
    }
    if visual_after is not None:
        pruned = [prefix + visual_after + text] * s.layers
        out["pruned_visual_tokens"] = visual_after
        out["pruned_prefill_flops"] = prefill_flops(pruned, s)
        out["pruned_visual_kv_bytes"] = kv_bytes([visual_after] * s.layers, s, bytes_value)
    return out


def attention_share(n: int, s: DecoderShape) -> float:
    """The share of a dense layer's FLOPs that attention (scores and values, 4 n^2 d) takes at n tokens."""
    return 4 * n * n * s.hidden / layer_flops(n, s)


def sparse_attention_table(s: DecoderShape, lengths: list[int], attended_share: float, probe_rows: int = 128,
                           bytes_value: int = 2) -> list[dict]:
    """Where attending among a share of the tokens pays (ZipVL's sparse attention): for each prefill length n, the
    dense prefill FLOPs, attention's share of them, the FLOPs when ceil(share x n) tokens attend at every layer
    (plus `probe_rows` probe rows scoring every key), and the KV cache either way. The linear layers and the MLP
    still run on every token."""
    rows = []
    for n in lengths:
        m = max(1, min(n, -(-int(attended_share * n * 1e6) // 1_000_000)))
        dense = prefill_flops([n] * s.layers, s)
        sparse = prefill_flops([n] * s.layers, s, [m] * s.layers) + s.layers * probe_flops(min(probe_rows, n), n, s)
        rows.append({"tokens": n, "attended": m, "prefill_flops_dense": dense, "attention_share": attention_share(n, s),
                     "prefill_flops_sparse": sparse, "flops_ratio": sparse / dense,
                     "kv_bytes_dense": kv_bytes([n] * s.layers, s, bytes_value),
                     "kv_bytes_sparse": kv_bytes([m] * s.layers, s, bytes_value)})
    return rows
