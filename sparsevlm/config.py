"""One configuration object for every pruning method the engine runs (docs/engine.md)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import ConfigError

COUNT_MODES = ("fixed", "paper", "code")
ACCOUNTINGS = ("paper", "flops")
FIXED_BUDGETS = (192, 128, 96, 64)

# Visual tokens kept DIRECTLY after each pruning layer of the 32-layer reference schedule (reference code v1.5,
# score.py); recycled clusters come on top (`v_token_num = kept.sum() + cluster_num`). Other depths, grids and
# budgets scale the nearest list (methods/sparsevlm.py, `sparsevlm_fixed`).
REFERENCE_FIXED_COUNTS = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}
# Pruning happens after these layers of a 32-layer decoder; other depths scale them (docs/engine.md).
REFERENCE_PRUNE_LAYERS_32 = (2, 6, 15)
REFERENCE_DEPTH = 32
REFERENCE_FASTV_K = 2  # FastV: layers 0..K-1 run in full, ranked in layer K-1
REFERENCE_GRID_TOKENS = 576


def check_accounting(accounting: str) -> None:
    if accounting not in ACCOUNTINGS:
        raise ConfigError(f"accounting must be one of {', '.join(ACCOUNTINGS)}, not {accounting!r}")


def check_budget(budget: int, grid_tokens: int | None = None) -> None:
    """A budget is a whole number of tokens from 1 to the image grid's (when the grid is known)."""
    if not isinstance(budget, int) or budget < 1:
        raise ConfigError(f"budget must be a positive whole number of tokens, not {budget!r}")
    if grid_tokens is not None and budget > grid_tokens:
        raise ConfigError(f"budget {budget} is larger than the image grid ({grid_tokens} tokens)")


@dataclass
class PruneConfig:
    """Which method runs and how.

    budget is the target visual-token figure; `accounting` says how it is met (docs/engine.md, schedule.py):
    "paper" = each method's published setting and counting, "flops" = every method at the same input-counted
    equal tokens (the same prefill cost).
    """

    method: str = "sparsevlm"
    budget: int = 64
    accounting: str = "paper"  # paper | flops
    # SparseVLM: how many tokens to drop at each pruning layer.
    count_mode: str = "fixed"  # fixed | paper (eq. 8, lambda) | code (reference scale/bias)
    lam: float = 1.0  # paper eq. 8
    scale: float = 13.5  # reference code, MME setting
    bias: float = 0.0
    prune_layers: tuple[int, ...] | None = None  # default: reference schedule scaled to depth
    # Token recycling (docs/engine.md).
    recycle: bool = True
    tau: float = 0.3
    theta: float = 0.1
    merge: str = "mean"  # mean (reference code) | sum (paper eq. 11)
    assign: str = "euclidean"  # euclidean (reference code) | cosine (paper)
    # Positions of surviving tokens: keep original ids (reference v2, FastV) or compact to 0..N-1 (v1, v1.5).
    # None: the method's own default (methods/<name>.py `default_positions`).
    positions: str | None = None
    rater_rule: str = "gt"  # gt: R > mean(R) (reference code) | ge: R >= mean(R) (paper)
    # FastV's K: layers 0..K-1 run in full, ranked by the last token in layer K-1 (default: 2 of 32, scaled).
    fastv_k: int | None = None
    seed: int = 0  # random baseline and clustering tie-break noise

    def validate(self, grid_tokens: int | None = None) -> PruneConfig:
        """The settings' ranges. Whether `method` names a registered method is the registry's to say
        (`methods.get_method`), so this module knows no method."""
        if not isinstance(self.method, str) or not self.method:
            raise ConfigError(f"method must be a method's name, not {self.method!r}")
        check_accounting(self.accounting)
        if self.count_mode not in COUNT_MODES:
            raise ConfigError(f"unknown count mode {self.count_mode!r}; choose one of {', '.join(COUNT_MODES)}")
        if self.merge not in ("mean", "sum"):
            raise ConfigError(f"merge must be 'mean' or 'sum', not {self.merge!r}")
        if self.assign not in ("euclidean", "cosine"):
            raise ConfigError(f"assign must be 'euclidean' or 'cosine', not {self.assign!r}")
        if self.positions not in (None, "keep", "compact"):
            raise ConfigError(f"positions must be 'keep' or 'compact', not {self.positions!r}")
        if self.rater_rule not in ("gt", "ge"):
            raise ConfigError(f"rater_rule must be 'gt' or 'ge', not {self.rater_rule!r}")
        if self.method != "dense":
            check_budget(self.budget, grid_tokens)
        if not 0.0 < self.tau <= 1.0 or not 0.0 < self.theta <= 1.0:
            raise ConfigError("tau and theta must lie in (0, 1]")
        if self.lam < 0:
            raise ConfigError("lambda must be >= 0")
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d["prune_layers"] = list(self.prune_layers) if self.prune_layers is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PruneConfig:
        d = dict(d)
        if d.get("prune_layers") is not None:
            d["prune_layers"] = tuple(d["prune_layers"])
        return cls(**d)
