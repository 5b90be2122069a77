"""SparseVLM as pure tensor functions (docs/engine.md). Nothing here knows about transformers.

Shapes: batch size 1 is assumed throughout; leading batch dimensions are stripped by the caller.
"""

from __future__ import annotations

import math

import torch


# --- 1. text raters -------------------------------------------------------------------------------------------
def text_relevance(hv: torch.Tensor, hq: torch.Tensor) -> torch.Tensor:
    """R = mean over visual rows of softmax_over_text(Hv Hq^T) (paper eq. 3-4; no 1/sqrt(D)).

    hv: (Lv, D) projected visual tokens; hq: (Lt, D) text embeddings. Returns (Lt,) float32.
    """
    logits = hv.float() @ hq.float().T
    return torch.softmax(logits, dim=-1).mean(dim=0)


def select_raters(relevance: torch.Tensor, rule: str = "gt") -> torch.Tensor:
    """Indices of text raters: R_i > mean(R) (reference code) or >= (paper). Never empty."""
    mean = relevance.mean()
    mask = relevance > mean if rule == "gt" else relevance >= mean
    if not bool(mask.any()):
        mask = torch.ones_like(mask)
    return mask.nonzero().flatten()


# --- 2. visual significance from rater rows of attention ------------------------------------------------------
def rows_attention_heads(
    q_rows: torch.Tensor, keys: torch.Tensor, row_index: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Post-softmax causal attention of a few query rows, per head, without the L x L matrix.

    q_rows: (H, r, hd) queries (RoPE applied) of the rows; keys: (Hkv, n, hd) keys (RoPE applied) of the
    whole sequence; row_index: (r,) sequence index of each row (a row sees keys 0..row_index).
    GQA: each group of H / Hkv query heads shares one key head. Returns (H, r, n) float32.
    """
    h, r, hd = q_rows.shape
    hkv = keys.shape[0]
    q = q_rows.float().reshape(hkv, h // hkv, r, hd)
    scores = torch.einsum("gjrd,gnd->gjrn", q, keys.float()) * scaling  # (Hkv, rep, r, n)
    n = keys.shape[1]
    future = torch.arange(n, device=keys.device)[None, :] > row_index.to(keys.device)[:, None]
    scores = scores.masked_fill(future, float("-inf"))
    return torch.softmax(scores, dim=-1).reshape(h, r, n)


def rows_attention(
    q_rows: torch.Tensor, keys: torch.Tensor, row_index: torch.Tensor, scaling: float
) -> torch.Tensor:
    """`rows_attention_heads` averaged over heads: (r, n) float32."""
    return rows_attention_heads(q_rows, keys, row_index, scaling).mean(dim=0)


def visual_significance(p: torch.Tensor) -> torch.Tensor:
    """Score of each visual token: mean over raters of P[:, j] (paper eq. 5)."""
    return p.mean(dim=0)


def attention_rank(p: torch.Tensor) -> int:
    """rank(P) with torch's default tolerance (sigma_max * max(m, n) * eps) (paper eq. 7)."""
    return int(torch.linalg.matrix_rank(p.float()).item())


# --- 3. how many tokens to drop ------------------------------------------------------------------------------
def paper_deleted_count(visual: int, rank: int, lam: float) -> int:
    """Deleted tokens N = floor(lambda * (Lv - rank(P))) (paper eq. 8)."""
    return max(0, min(visual, math.floor(lam * (visual - rank))))


def code_kept_count(visual: int, rank: int, scale: float, bias: float) -> int:
    """Kept tokens = min(int(rank(P) * scale + bias), Lv - 1) (reference code)."""
    return max(1, min(int(rank * scale + bias), visual - 1))


def recycle_sizes(deleted: int, tau: float, theta: float) -> tuple[int, int]:
    """(tokens recycled, clusters) for `deleted` tokens: top tau (+1) are clustered into int(n*theta)+1."""
    if deleted <= 0:
        return 0, 0
    n = min(deleted, int(deleted * tau) + 1)
    return n, min(n, int(n * theta) + 1)


def direct_keep_for_total(visual: int, total: int, recycle: bool, tau: float, theta: float) -> int:
    """Directly kept tokens d such that d + clusters(visual - d) == total (counts include recycled tokens).

    The largest d whose total does not exceed `total`; at least 1 (or 0 when recycling alone fills it).
    """
    total = max(1, min(total, visual))
    if not recycle:
        return total
    for d in range(total, -1, -1):
        if d + recycle_sizes(visual - d, tau, theta)[1] <= total:
            return d
    return 0


# --- 4. token recycling: density-peak kNN clustering -----------------------------------------------------------
def density_peak_clusters(
    x: torch.Tensor, n_clusters: int, assign: str = "euclidean", generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peak clustering with kNN density (paper eq. 9-10; DPC-kNN as in the reference code).

    x: (n, D). Returns (centers (C,) indices into x, labels (n,) cluster id in 0..C-1; a center has its own id).
    """
    n, dim = x.shape
    c = max(1, min(n_clusters, n))
    if c == n:
        return torch.arange(n, device=x.device), torch.arange(n, device=x.device)
    xf = x.float()
    dist = torch.cdist(xf, xf) / math.sqrt(dim)
    k = c  # k nearest neighbours, self included (reference code)
    knn = torch.topk(dist, k=k, dim=-1, largest=False).values
    density = torch.exp(-(knn**2).mean(dim=-1))
    noise = torch.rand(density.shape, generator=generator, device="cpu").to(density.device)
    density = density + noise * 1e-6
    higher = density[None, :] > density[:, None]  # higher[i, j]: j is denser than i
    dist_max = dist.max()
    delta = torch.where(higher, dist, dist_max).min(dim=-1).values
    delta[density.argmax()] = dist_max  # the densest point gets the largest distance
    centers = torch.topk(density * delta, k=c).indices
    if assign == "cosine":
        xn = torch.nn.functional.normalize(xf, dim=-1)
        labels = (xn @ xn[centers].T).argmax(dim=-1)
    else:
        labels = dist[:, centers].argmin(dim=-1)
    labels[centers] = torch.arange(c, device=x.device)
    return centers, labels


def merge_clusters(x: torch.Tensor, labels: torch.Tensor, n_clusters: int, mode: str = "mean") -> torch.Tensor:
    """One token per cluster: element-wise mean (reference code) or sum (paper eq. 11). Returns (C, D)."""
    out = torch.zeros(n_clusters, x.shape[-1], dtype=torch.float32, device=x.device)
    out.index_add_(0, labels, x.float())
    if mode == "mean":
        counts = torch.bincount(labels, minlength=n_clusters).clamp(min=1).to(out)
        out = out / counts[:, None]
    return out.to(x.dtype)
