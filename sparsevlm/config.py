"""One configuration object for every pruning method the engine runs (SPEC sections 3-6)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import ConfigError

METHODS = ("dense", "sparsevlm", "fastv", "fastervlm", "random")
COUNT_MODES = ("fixed", "paper", "code")
FIXED_BUDGETS = (192, 128, 96, 64)

# Kept visual tokens after each pruning layer of the 32-layer reference schedule (reference code v1.5).
# They include the recycled tokens. Used as the *shape* of the schedule for every depth (see schedule.py).
REFERENCE_FIXED_COUNTS = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}
# Pruning happens after these layers of a 32-layer decoder; other depths scale them (SPEC section 2).
REFERENCE_PRUNE_LAYERS_32 = (2, 6, 15)
REFERENCE_DEPTH = 32
REFERENCE_GRID_TOKENS = 576


@dataclass
class PruneConfig:
    """Which method runs and how.

    budget is the target *equal-token* figure (mean visual tokens per decoder layer, SPEC section 7): every
    method is configured so that it processes that many visual tokens on average, which is how the papers
    compare methods.
    """

    method: str = "sparsevlm"
    budget: int = 64
    # SparseVLM: how many tokens to drop at each pruning layer.
    count_mode: str = "fixed"  # fixed | paper (eq. 8, lambda) | code (reference scale/bias)
    lam: float = 1.0  # paper eq. 8
    scale: float = 13.5  # reference code, MME setting
    bias: float = 0.0
    prune_layers: tuple[int, ...] | None = None  # default: reference schedule scaled to depth
    # fixed mode: "equal" derives counts so equal tokens hit the budget (any depth); "reference" uses the
    # v1.5 lists verbatim (32 layers, 576 tokens only).
    fixed_schedule: str = "equal"
    # Token recycling (SPEC section 4).
    recycle: bool = True
    tau: float = 0.3
    theta: float = 0.1
    merge: str = "mean"  # mean (reference code) | sum (paper eq. 11)
    assign: str = "euclidean"  # euclidean (reference code) | cosine (paper)
    # Positions of surviving tokens: keep original ids (reference v2, FastV) or compact to 0..N-1 (v1).
    positions: str = "keep"
    rater_rule: str = "gt"  # gt: R > mean(R) (reference code) | ge: R >= mean(R) (paper)
    # FastV: prune after layer K (default: 2 of 32, scaled to depth).
    fastv_layer: int | None = None
    seed: int = 0  # random baseline and clustering tie-break noise

    def validate(self, grid_tokens: int | None = None) -> PruneConfig:
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.count_mode not in COUNT_MODES:
            raise ConfigError(f"unknown count mode {self.count_mode!r}; choose one of {', '.join(COUNT_MODES)}")
        if self.merge not in ("mean", "sum"):
            raise ConfigError(f"merge must be 'mean' or 'sum', not {self.merge!r}")
        if self.assign not in ("euclidean", "cosine"):
            raise ConfigError(f"assign must be 'euclidean' or 'cosine', not {self.assign!r}")
        if self.positions not in ("keep", "compact"):
            raise ConfigError(f"positions must be 'keep' or 'compact', not {self.positions!r}")
        if self.rater_rule not in ("gt", "ge"):
            raise ConfigError(f"rater_rule must be 'gt' or 'ge', not {self.rater_rule!r}")
        if self.fixed_schedule not in ("equal", "reference"):
            raise ConfigError(f"fixed_schedule must be 'equal' or 'reference', not {self.fixed_schedule!r}")
        if self.method != "dense":
            if not isinstance(self.budget, int) or self.budget < 1:
                raise ConfigError(f"budget must be a positive whole number of tokens, not {self.budget!r}")
            if grid_tokens is not None and self.budget > grid_tokens:
                raise ConfigError(f"budget {self.budget} is larger than the image grid ({grid_tokens} tokens)")
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
