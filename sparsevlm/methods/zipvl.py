"""ZipVL (He et al., "ZipVL: Efficient Large Vision-Language Models with Dynamic Token Sparsification", ICCV 2025,
arXiv 2410.08584 v2) as pure tensor functions and a registered method (docs/engine.md, "ZipVL").

ZipVL keeps every token in the residual stream. At every decoder layer, in prefill:
1. probe rows: the attention of a few explicit query rows (the 64 most recent positions and 64 random ones) over
   every key, post-softmax, causal, in fp32 (the rest of the layer keeps SDPA / FlashAttention);
2. accumulated scores a_j: column sums over the probe rows and the heads;
3. the count p (the tau rule): the smallest p whose largest accumulated scores hold a share tau of their total;
4. normalized scores: a_j divided by the number of queries that can see token j (n - j under the causal mask);
5. the attended set T: the p tokens of largest normalized score, and the last position always;
6. only T takes part in attention at this layer (causal among themselves, gathered, run through the model's own
   attention implementation); a token outside T gets no attention output here and still goes through the MLP;
   its keys and values are evicted from this layer's cache, so decoding attends to T alone (plus new tokens).
Selection is per layer and not cumulative: a token left out at one layer is scored again at the next.

No official code is public; where the paper is silent, the readings are named in docs/engine.md and the options
below offer the other readings where they are cheap.
"""

from __future__ import annotations

import torch

from ..config import PruneConfig
from ..errors import ConfigError
from ..options import Option
from .base import AttentionChoice, AttentionInput, ModelGeometry, Plan, PruneMethod

NAME = "zipvl"
PROBE_MODES = ("recent+random", "all", "both")
FORMULA = "p = min{p : Σ_{j≤p} a↓_j ≥ τ·Σa};  T = top-p of ã_j = a_j / (queries that see j)  ∪ {last}"


# --- the pure rules ----------------------------------------------------------------------------------------------
def tau_count(scores: torch.Tensor, tau: float) -> int:
    """p = the smallest number of tokens whose largest accumulated scores reach a share tau of the total
    (at least 1; every token when the total is zero). scores: (n,) non-negative."""
    if not 0.0 < tau <= 1.0:
        raise ConfigError(f"zipvl option tau must lie in (0, 1], not {tau}")
    s = scores.double().flatten()
    cum = torch.sort(s, descending=True).values.cumsum(0)
    total = cum[-1]
    if total <= 0:
        return int(s.numel())
    p = int(torch.searchsorted(cum, tau * total, right=False)) + 1
    return max(1, min(p, s.numel()))


def probe_positions(n: int, recent: int, random: int, generator: torch.Generator) -> torch.Tensor:
    """Probe query rows: the `recent` last positions and `random` positions drawn uniformly with replacement from
    before them (ZipCache's sampling), ascending; sizes clamped to the sequence."""
    recent = max(0, min(recent, n))
    pool = n - recent
    # Drawn on the CPU from a seeded CPU generator (the same rows on every device); the seam moves them.
    rand = torch.randint(0, pool, (min(random, pool),), generator=generator, device="cpu") if pool else \
        torch.empty(0, dtype=torch.long, device="cpu")
    return torch.cat([rand, torch.arange(pool, n, device="cpu")]).sort().values


def visible_counts(n: int, rows: torch.Tensor | None) -> torch.Tensor:
    """How many query rows can see each key j under the causal mask: n - j for every row (rows None), else the
    number of rows at positions >= j (a row counted as often as it was drawn)."""
    if rows is None:
        return torch.arange(n, 0, -1, dtype=torch.float64, device="cpu")  # `normalized` moves it
    hits = torch.bincount(rows.long().cpu(), minlength=n).double()
    return hits.flip(0).cumsum(0).flip(0)


def normalized(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """ã_j = a_j / (queries that can see j); a key no row sees scores 0."""
    return scores.double() / counts.to(scores.device).clamp(min=1.0)


def attended_set(norm: torch.Tensor, p: int, keep_last: bool = True) -> tuple[torch.Tensor, bool]:
    """(T, forced): the p largest normalized scores of each row of `norm` ((G, n): one row shared by all heads, or
    one per KV head), ascending, and whether the last position had to be added. Shared (G = 1): T = top-p ∪ {last}.
    Per head: the last position is placed inside each head's p (heads' caches must hold the same count)."""
    g, n = norm.shape
    p = max(1, min(p, n))
    if g == 1:
        top = torch.topk(norm[0], p).indices
        forced = keep_last and not bool((top == n - 1).any())
        if forced:
            top = torch.cat([top, torch.tensor([n - 1], device=top.device)])
        return top.sort().values[None], forced
    scored = norm.clone()
    forced = False
    if keep_last:
        natural = torch.topk(norm, p, dim=1).indices
        forced = not bool((natural == n - 1).any(dim=1).all())
        scored[:, n - 1] = float("inf")
    return torch.topk(scored, p, dim=1).indices.sort(dim=1).values, forced


def mass_curve(scores: torch.Tensor, points: int = 128) -> tuple[list[int], list[float]]:
    """The sorted cumulative share of the accumulated scores, at up to `points` ranks (1-based, always including
    the first and the last): what the page plots with tau marked."""
    s = torch.sort(scores.double().flatten(), descending=True).values
    cum = s.cumsum(0)
    total = float(cum[-1]) if cum.numel() else 0.0
    n = s.numel()
    ranks = sorted({1, n, *(int(round(1 + i * (n - 1) / (points - 1))) for i in range(points))}) if n else []
    if total <= 0:
        return ranks, [0.0] * len(ranks)
    at = torch.tensor(ranks, dtype=torch.long, device=cum.device) - 1
    return ranks, (torch.round(cum[at] / total * 1e6) / 1e6).tolist()


# --- the registered method ---------------------------------------------------------------------------------------
class ZipVL(PruneMethod):
    """ZipVL in the engine: every decoder layer, through the attention seam (sparsevlm/attention.py); no stage
    cuts the residual stream, so every layer holds every visual token and only attention and the cache shrink."""

    name = NAME
    label = "ZipVL"
    ranks_by = "probe attention mass (adaptive count)"
    default_positions = "keep"
    paper_counting = ("no budget: tau sets each layer's attended count; the budget column reports the mean "
                      "attended visual tokens (or fits tau to the budget with fit=budget)")
    changes_attention = True
    budgeted = False
    benchmark_options = ({"tau": 0.975}, {"tau": 0.96})  # the paper's two settings on LLaVA-1.5-7B (v1 Table 1)
    options = (
        Option("tau", 0.975, "share of the attention mass the attended tokens must hold at each layer",
               low=0.0, high=1.0, low_open=True, label="τ (attention-mass share)", param="zipvl_tau"),
        Option("probes", "recent+random", "which query rows score the keys: the 64 most recent and 64 random "
               "positions (the paper's), all rows (full attention), or both (run on the probes, record how far "
               "they agree with full attention)", kind="choice", choices=PROBE_MODES, label="Probe rows",
               param="zipvl_probes", choice_labels=("64 recent + 64 random (the paper's)", "all rows (exact)",
                                                    "probes, compared with all rows")),
        Option("recent", 64, "recent probe rows (the last positions)", kind="int", low=0, ui=False),
        Option("random", 64, "random probe rows (drawn with replacement before the recent ones, from the seed)",
               kind="int", low=0, ui=False),
        Option("selection", "shared", "one attended set per layer for all heads (shared), or one per KV head with "
               "the same count (per-head)", kind="choice", choices=("shared", "per-head"), ui=False),
        Option("divisor", "causal", "normalization: divide a column sum by the queries that can see the token "
               "(causal: n - j, as ZipCache's code) or by the probe rows that can see it (probes)", kind="choice",
               choices=("causal", "probes"), ui=False),
        Option("fit", "none", "none: run at tau; budget: fit tau per input so that the mean attended visual tokens "
               "(paper accounting) or the prefill FLOPs (flops accounting) match the budget - ZipVL's rule, tau "
               "fitted to the budget, not the paper's setting", kind="choice", choices=("none", "budget"),
               label="τ: fixed or fitted to the budget", param="zipvl_fit", choice_labels=("run at τ (the paper's)",
                                                            "fitted to the budget (ZipVL's rule, τ fitted)")),
    )

    def budget_fit(self, cfg: PruneConfig) -> str | None:
        return "tau" if cfg.fit == "budget" else None

    def plan(self, cfg: PruneConfig, geo: ModelGeometry) -> Plan:
        fitted = " fitted to the budget" if cfg.fit == "budget" else ""
        return Plan(positions=self.positions(cfg), attention_layers=tuple(range(geo.depth)),
                    note=f"ZipVL: every decoder layer attends among the tokens holding τ = {cfg.tau:g}{fitted} of "
                         f"its probe attention mass ({cfg.probes} probes, {cfg.selection} selection, "
                         f"{cfg.divisor} divisor); the rest skip attention there and leave that layer's cache")

    def attend(self, cfg: PruneConfig, inp: AttentionInput) -> AttentionChoice:
        n = inp.n
        gen = inp.memo.get("probe_generator")
        if gen is None:
            gen = inp.memo["probe_generator"] = torch.Generator(device="cpu").manual_seed(int(cfg.seed))
        if cfg.probes == "all":
            rows = None
        else:
            rows = probe_positions(n, int(cfg.recent), int(cfg.random), gen)
        scores = inp.column_sums(rows, cfg.selection == "per-head")  # (G, n) float64
        total = scores.sum(dim=0)
        p = tau_count(total, cfg.tau)
        counts = visible_counts(n, rows if cfg.divisor == "probes" else None)
        attended, forced = attended_set(normalized(scores, counts[None]), p)
        ranks, mass = mass_curve(total)
        extras = {"tau": float(cfg.tau), "probes": rows.tolist() if rows is not None else "all",
                  "forced_last": forced, "curve_ranks": ranks, "curve_mass": mass}
        if cfg.probes == "both":
            full = inp.column_sums(None, cfg.selection == "per-head")
            p_full = tau_count(full.sum(dim=0), cfg.tau)
            c_full = visible_counts(n, None)
            t_full, _ = attended_set(normalized(full, c_full[None]), p_full)
            a, b = set(attended[0].tolist()), set(t_full[0].tolist())
            extras["full"] = {"p": p_full, "attended": len(b), "overlap": len(a & b),
                              "recall": len(a & b) / max(1, len(b)), "jaccard": len(a & b) / max(1, len(a | b))}
        return AttentionChoice(attended=attended, p=p, formula=FORMULA, extras=extras)
