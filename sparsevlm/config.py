"""One configuration object for every pruning method the engine runs (docs/engine.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

ACCOUNTINGS = ("paper", "flops")
FIXED_BUDGETS = (192, 128, 96, 64)
# LLaVA-NeXT's budgets in the papers (VisionZip, PyramidDrop, DART, CDPruner, ...: 640 / 320 / 160 of up to 2,880
# tokens); `presets.Preset.budgets` names each model's.
NEXT_BUDGETS = (640, 320, 160)


def budgets_for(anyres: bool) -> tuple[int, ...]:
    """The budgets the papers report for a model: LLaVA-NeXT's (anyres) or LLaVA-1.5's."""
    return NEXT_BUDGETS if anyres else FIXED_BUDGETS

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


# Settings that lived on PruneConfig before each method declared its own (methods/<name>.py `options`): settings
# files, traces and /run records written then carry them as flat keys, and `from_dict` moves them into `options`.
LEGACY_OPTION_KEYS = ("count_mode", "lam", "scale", "bias", "prune_layers", "recycle", "tau", "theta", "merge",
                      "assign", "rater_rule", "fastv_k")
SHARED_KEYS = ("method", "budget", "accounting", "positions", "seed")


@dataclass(init=False)
class PruneConfig:
    """Which method runs and how: what every method shares, plus the chosen method's own `options`.

    budget is the target visual-token figure; `accounting` says how it is met (docs/engine.md, schedule.py):
    "paper" = each method's published setting and counting, "flops" = every method at the same input-counted
    equal tokens (the same prefill cost). `options` holds the method's own settings by name, as its class declares
    them (`PruneMethod.options`, sparsevlm/options.py); what is left out takes the declared default, and
    `cfg.<option>` reads the value for this configuration's method. Options may also be passed as keywords:
    `PruneConfig(method="zipvl", tau=0.96)`.
    """

    method: str = "sparsevlm"
    budget: int = 64
    accounting: str = "paper"  # paper | flops
    # Positions of surviving tokens: keep original ids (reference v2, FastV) or compact to 0..N-1 (v1, v1.5).
    # None: the method's own default (methods/<name>.py `default_positions`).
    positions: str | None = None
    seed: int = 0  # random draws (random baseline, clustering tie-break noise, ZipVL's random probes)
    options: dict = field(default_factory=dict)

    def __init__(self, method: str = "sparsevlm", budget: int = 64, accounting: str = "paper",
                 positions: str | None = None, seed: int = 0, options: dict | None = None, **more: Any):
        self.method, self.budget, self.accounting = method, budget, accounting
        self.positions, self.seed = positions, seed
        self.options = {**dict(options or {}), **more}

    def __getattr__(self, name: str) -> Any:
        """`cfg.<option>`: the chosen method's option, its declared default when not set."""
        if name.startswith("_") or name in SHARED_KEYS or name == "options":
            raise AttributeError(name)
        declared = _declared(self.__dict__.get("method"))
        if declared is None or name not in declared:
            raise AttributeError(f"{self.__dict__.get('method')!r} has no option {name!r}")
        opts = self.__dict__.get("options", {})
        return opts[name] if name in opts else declared[name].default

    def resolved_options(self) -> dict:
        """Every option the method declares, set or default, as JSON data."""
        declared = _declared(self.method) or {}
        return {name: o.plain(self.options.get(name, o.default)) for name, o in declared.items()}

    def validate(self, grid_tokens: int | None = None) -> PruneConfig:
        """The settings' ranges, the method's options included (each coerced to its kind). Whether `method`
        names a registered method is the registry's to say (`methods.get_method`)."""
        if not isinstance(self.method, str) or not self.method:
            raise ConfigError(f"method must be a method's name, not {self.method!r}")
        check_accounting(self.accounting)
        if self.positions not in (None, "keep", "compact"):
            raise ConfigError(f"positions must be 'keep' or 'compact', not {self.positions!r}")
        if self.method != "dense":
            check_budget(self.budget, grid_tokens)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be a whole number, not {self.seed!r}")
        declared = _declared(self.method)
        if declared is not None:
            unknown = sorted(set(self.options) - set(declared))
            if unknown:
                has = ", ".join(declared) if declared else "none"
                raise ConfigError(f"{self.method} has no option {', '.join(map(repr, unknown))} (its options: {has})")
            self.options = {k: declared[k].check(v, self.method) for k, v in self.options.items()}
        return self

    def to_dict(self) -> dict:
        """JSON data: the shared settings and every option of the method (defaults filled in)."""
        return {"method": self.method, "budget": self.budget, "accounting": self.accounting,
                "positions": self.positions, "seed": self.seed, "options": self.resolved_options()}

    @classmethod
    def from_dict(cls, d: dict) -> PruneConfig:
        """From `to_dict` data, or from the flat dicts written before options moved out (their keys move into
        `options` when the method declares them; a setting the method never read is dropped)."""
        d = dict(d)
        options = dict(d.pop("options", None) or {})
        declared = _declared(d.get("method", "sparsevlm"))
        for key in LEGACY_OPTION_KEYS:
            if key in d:
                value = d.pop(key)
                if declared is not None and key in declared and key not in options:
                    options[key] = value
        shared = {k: d[k] for k in SHARED_KEYS if k in d}
        return cls(**shared, options=options)


def _declared(method: str | None) -> dict | None:
    """name -> Option of a registered method (None when the name is not registered)."""
    from .methods import registered  # the registry imports this module: read it at call time

    m = registered(method) if isinstance(method, str) else None
    return None if m is None else {o.name: o for o in m.options}
