"""A method's own settings, declared once on its class (`PruneMethod.options`) and read everywhere else.

Each `Option` carries its default, its range or choices, and its help. The CLI's flags (cli.py), the page's
per-method settings and its API parameters (app/layout.py, app/handlers.py) and the loading of settings written
before options moved out of `PruneConfig` are all generated from these declarations: adding a method with
settings, or a setting to a method, touches no CLI or UI code.

Two methods may use the same option name for different things (SparseVLM's `tau` is its recycling share,
ZipVL's `tau` its attention-mass threshold): an option is always read for the configuration's own method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

KINDS = ("float", "int", "bool", "choice", "layers")


@dataclass(frozen=True)
class Option:
    """One setting of one method."""

    name: str  # the key in PruneConfig.options, the attribute the method reads (cfg.<name>), the CLI flag's stem
    default: Any
    help: str
    kind: str = "float"  # float | int | bool | choice | layers (a comma-separated list of decoder layers)
    choices: tuple = ()
    low: float | None = None  # the range: low <= x (low < x when low_open), x <= high
    high: float | None = None
    low_open: bool = False
    optional: bool = False  # None is allowed (meaning: the method's own rule, e.g. FastV's K scaled to depth)
    label: str = ""  # the page's label (default: the name)
    ui: bool = True  # shown among the page's settings for the method
    param: str = ""  # the page's API parameter name (default: "<method>_<name>")
    choice_labels: tuple = ()  # the page's labels for the choices (same order)
    aliases: tuple = ()  # further CLI flags for the same option (names it had before, e.g. --mode)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"option {self.name}: kind must be one of {KINDS}")
        if self.kind == "choice" and not self.choices:
            raise ValueError(f"option {self.name}: a choice needs its choices")

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def range_text(self) -> str:
        if self.kind == "choice":
            return " | ".join(str(c) for c in self.choices)
        if self.kind == "bool":
            return "true | false"
        if self.kind == "layers":
            return "increasing decoder layers, e.g. 2,6,15"
        if self.low is None and self.high is None:
            return "any"
        lo = "" if self.low is None else f"{'(' if self.low_open else '['}{self.low:g}"
        hi = "" if self.high is None else f"{self.high:g}]"
        if lo and hi:
            return f"{lo}, {hi}"
        return f">{'' if self.low_open else '='} {self.low:g}" if lo else f"<= {self.high:g}"

    def check(self, value: Any, method: str) -> Any:
        """The value coerced to the option's kind, or a ConfigError naming the method, the option and the range."""
        where = f"{method} option {self.name}"
        if value is None:
            if self.optional:
                return None
            raise ConfigError(f"{where} needs a value ({self.range_text()})")
        if self.kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.strip().lower() in ("true", "1", "yes")
            if isinstance(value, int | float) and value in (0, 1):
                return bool(value)
            raise ConfigError(f"{where} must be true or false, not {value!r}")
        if self.kind == "choice":
            if value not in self.choices:
                raise ConfigError(f"{where} must be one of {', '.join(map(str, self.choices))}, not {value!r}")
            return value
        if self.kind == "layers":
            if isinstance(value, str):
                try:
                    value = [int(v) for v in value.replace(" ", "").split(",") if v]
                except ValueError:
                    raise ConfigError(f"{where} must be decoder layer numbers such as 2,6,15, not {value!r}") from None
            try:
                layers = tuple(int(v) for v in value)
            except (TypeError, ValueError):
                raise ConfigError(f"{where} must be a list of decoder layers, not {value!r}") from None
            if not layers or any(v < 0 for v in layers) or list(layers) != sorted(set(layers)):
                raise ConfigError(f"{where} must be increasing decoder layers from 0, not {list(layers)}")
            return layers
        try:
            if isinstance(value, bool):
                raise TypeError
            number = float(value)
            if self.kind == "int":
                if number != int(number):
                    raise ValueError
                number = int(number)
        except (TypeError, ValueError, OverflowError):
            kind = "whole number" if self.kind == "int" else "number"
            raise ConfigError(f"{where} must be a {kind}, not {value!r}") from None
        if number != number:  # NaN
            raise ConfigError(f"{where} must be a number, not NaN")
        too_low = self.low is not None and (number <= self.low if self.low_open else number < self.low)
        too_high = self.high is not None and number > self.high
        if too_low or too_high:
            bounded = self.low is not None and self.high is not None
            raise ConfigError(f"{where} must {'lie in' if bounded else 'be'} {self.range_text()}, not {number:g}")
        return number

    def plain(self, value: Any) -> Any:
        """The value as JSON data (layers as a list)."""
        return list(value) if self.kind == "layers" and value is not None else value


def option_names(options: tuple[Option, ...]) -> set[str]:
    return {o.name for o in options}


def setting_label(method: str, options: dict) -> str:
    """A benchmark setting's name from its method and options: zipvl-tau0.975."""
    return method + "-" + "-".join(f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}" for k, v in options.items())
