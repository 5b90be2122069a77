"""The attention seam: the one place the engine changes attention itself.

Most methods cut tokens out of the residual stream (hooks.py). A method that decides which tokens take part in
attention at a layer (ZipVL) gets it here, and nothing else in the engine touches attention internals:

- transformers' `AttentionInterface` gets one function, "sparsevlm-seam". While a seam is installed, each chosen
  decoder layer's attention module reads a copy of its config that names it, so that layer's attention call comes
  here with the post-RoPE q, k, v after the cache update; every other module (other layers, the vision tower, other
  models in the process) is untouched, and `remove` restores the layer's own config.
- In prefill, the seam asks its `decide(layer, q, k, v) -> attended` for the positions that attend at this layer
  ((G, m) ascending: G = 1 for every head, or one row per KV head), gathers q, k, v at those positions and runs the
  layer's OWN attention implementation (SDPA, FlashAttention or eager) on the gathered tensors, causally among
  them (their order is the sequence order). Positions outside the set get a zero attention output: the residual
  stream passes them through the attention block unchanged, and the MLP still runs on them.
- Right after the attention call, a forward hook on the module evicts the other positions' keys and values from
  that layer's KV cache, read and written on the cache object itself.
- In decoding (one new token), the layer's own implementation runs with no mask: the new token attends to what
  the cache holds (the attended positions) and to the tokens generated since.

Batch size 1 and no padding (the pruning plumbing checks both).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

SEAM = "sparsevlm-seam"
# Keyword arguments that describe the whole sequence: they must not reach the implementation with gathered q/k/v.
_SEQUENCE_KWARGS = ("position_ids", "cache_position", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                    "max_length_k")


def _base(name: str | None) -> Callable:
    from transformers.models.llama.modeling_llama import eager_attention_forward

    return ALL_ATTENTION_FUNCTIONS.get_interface(name or "eager", eager_attention_forward)


def _seam_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The function the interface calls for a layer routed through a seam."""
    seam: LayerSeam = module._sparsevlm_seam
    return seam.attend(module, query, key, value, attention_mask, scaling, dropout, **kwargs)


def _causal_mask(m: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.full((m, m), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)[None, None]


class LayerSeam:
    """One decoder layer's attention routed through `decide` while prefilling (see the module docstring)."""

    def __init__(self, attn_module, decide: Callable, prefilling: Callable[[], bool]):
        self.module = attn_module
        self.decide = decide
        self.prefilling = prefilling
        self.own_config = attn_module.config
        self.impl_name = self.own_config._attn_implementation or "eager"
        self.base = _base(self.impl_name)  # the layer's own implementation, looked up once
        self.attended: torch.Tensor | None = None  # this prefill's choice, until the cache is evicted
        self._hook = None

    def install(self) -> LayerSeam:
        AttentionInterface.register(SEAM, _seam_attention)
        routed = copy.copy(self.own_config)
        routed._attn_implementation = SEAM
        self.module.config = routed
        self.module._sparsevlm_seam = self
        self._hook = self.module.register_forward_hook(self._evict, with_kwargs=True)
        return self

    def remove(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.module.config = self.own_config
        if getattr(self.module, "_sparsevlm_seam", None) is self:
            del self.module._sparsevlm_seam

    # --- the attention call ----------------------------------------------------------------------------------------
    def attend(self, module, query, key, value, attention_mask, scaling, dropout, **kwargs):
        base = self.base
        if query.shape[2] == 1 or not self.prefilling():
            # Decoding: the new token sees every cached key (this layer's cache is shorter than the model-wide mask).
            return base(module, query, key, value, None, scaling=scaling, dropout=dropout, **kwargs)
        if query.shape[0] != 1:
            raise ValueError("the attention seam runs batch size 1")
        attended = self.decide(query, key, value, scaling).to(query.device)
        self.attended = attended
        rest = {k: v for k, v in kwargs.items() if k not in _SEQUENCE_KWARGS}
        b, h, n, hd = query.shape
        hkv = key.shape[1]
        out = query.new_zeros(b, n, h, value.shape[-1])  # the implementations return (batch, seq, heads, dim)
        groups = attended.shape[0]
        per = h // groups  # query heads per row of `attended`
        kv_per = hkv // groups
        for g in range(groups):
            idx = attended[g]
            m = idx.numel()
            mask = _causal_mask(m, query.dtype, query.device) if self.impl_name == "eager" else None
            q = query[:, g * per:(g + 1) * per].index_select(2, idx)
            k = key[:, g * kv_per:(g + 1) * kv_per].index_select(2, idx)
            v = value[:, g * kv_per:(g + 1) * kv_per].index_select(2, idx)
            o, _ = base(module, q, k, v, mask, scaling=scaling, dropout=dropout, **rest)
            if groups == 1:
                out.index_copy_(1, idx, o.to(out.dtype))
            else:
                out[:, idx, g * per:(g + 1) * per] = o.to(out.dtype)
        return out, None

    # --- the cache -------------------------------------------------------------------------------------------------
    def _evict(self, module, args, kwargs, output):
        """Right after the prefill's attention call: the layer's cache keeps the attended positions only."""
        attended, self.attended = self.attended, None
        cache = kwargs.get("past_key_values")
        if attended is None or cache is None:
            return None
        layer = cache.layers[module.layer_idx]
        keys, values = layer.keys, layer.values
        if attended.shape[0] == 1:
            idx = attended[0].to(keys.device)
            layer.keys, layer.values = keys.index_select(2, idx), values.index_select(2, idx)
        else:  # one row per KV head
            idx = attended.to(keys.device)[None, :, :, None]
            layer.keys = torch.gather(keys, 2, idx.expand(-1, -1, -1, keys.shape[-1]))
            layer.values = torch.gather(values, 2, idx.expand(-1, -1, -1, values.shape[-1]))
        return None


def column_sums(query: torch.Tensor, key: torch.Tensor, scaling: float, rows: torch.Tensor | None,
                per_head: bool, chunk: int = 256) -> torch.Tensor:
    """Column sums of the post-softmax causal attention of query `rows` (None: every row) over every key, fp32
    softmax, summed over the rows, then over the heads ((1, n) float64) or over each KV head's query heads
    ((kv_heads, n)). query: (1, H, n, hd) and key: (1, Hkv, n, hd), both RoPE'd. Rows are taken in chunks, so
    the n x n matrix is never held whole."""
    _, h, n, hd = query.shape
    hkv = key.shape[1]
    k = key[0].float()  # (Hkv, n, hd)
    positions = torch.arange(n, device=query.device) if rows is None else rows.to(query.device)
    sums = torch.zeros(h, n, dtype=torch.float64, device=query.device)
    keys_at = torch.arange(n, device=query.device)
    kt = k.transpose(1, 2)[:, None]  # (Hkv, 1, hd, n)
    for start in range(0, positions.numel(), chunk):
        pos = positions[start:start + chunk]
        q = query[0].index_select(1, pos).float().reshape(hkv, h // hkv, pos.numel(), hd)
        logits = torch.matmul(q * scaling, kt)  # (Hkv, group, r, n)
        logits.masked_fill_(keys_at[None, :] > pos[:, None], float("-inf"))
        sums += torch.softmax(logits, dim=-1).sum(dim=2).reshape(h, n).double()
    if per_head:
        return sums.reshape(hkv, h // hkv, n).sum(dim=1)
    return sums.sum(dim=0, keepdim=True)
