"""Ranges of numeric settings, declared beside each config field and checked when a config is made.

A field states its range in its metadata (``field(default=0.05, metadata=FRACTION)``) and the
config's ``__post_init__`` calls ``check_ranges(self)``, so the command line and the Python API
refuse the same values with the same sentence, naming the flag: ``--features must be a positive
integer; got 0.``
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from tca import TcaError


@dataclass(frozen=True)
class Range:
    """An interval of allowed values; ``None`` ends are unbounded."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    words: str = ""
    """How the range reads in a sentence ("a positive integer"); derived from the ends when empty."""

    def __contains__(self, value: float) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or not (value > self.high or (self.high_open and value == self.high))

    def __str__(self) -> str:
        if self.words:
            return self.words
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        return f"in {'(' if self.low_open else '['}{lo}, {hi}{')' if self.high_open else ']'}"


def _meta(r: Range) -> dict:
    return {"range": r}


POSITIVE = _meta(Range(0, None, low_open=True, words="positive"))
"""Greater than 0 (counts, widths, learning rates, sizes)."""
NON_NEGATIVE = _meta(Range(0, None, words="at least 0"))
"""0 or more (0 often meaning "none" or "off": see the field)."""
FRACTION = _meta(Range(0, 1, low_open=True, high_open=True, words="a fraction strictly between 0 and 1"))
"""Strictly between 0 and 1 (a share of the data held out or warmed up)."""
SHARE = _meta(Range(0, 1, low_open=True, words="a fraction in (0, 1]"))
"""More than 0 and at most 1 (a share kept)."""
PROPORTION = _meta(Range(0, 1, words="a proportion in [0, 1]"))
"""From 0 to 1 inclusive (a threshold on a share)."""


def at_least(low: float) -> dict:
    """At least ``low``."""
    return _meta(Range(low, None, words=f"at least {low:g}"))


def between(low: float, high: float) -> dict:
    """From ``low`` to ``high`` inclusive."""
    return _meta(Range(low, high))


def flag_of(f: dataclasses.Field) -> str:
    """The command-line name of a field (its ``flag`` metadata, else ``--field-name``)."""
    flags = [n for n in f.metadata.get("flag", ()) if n.startswith("--")]
    return flags[0] if flags else "--" + f.name.replace("_", "-")


def check_ranges(cfg) -> None:
    """Raise ``TcaError`` for the first field of ``cfg`` outside its declared range (None passes:
    it means "the default" wherever a field allows it; in a list every value is checked)."""
    for f in dataclasses.fields(cfg):
        allowed = f.metadata.get("range")
        value = getattr(cfg, f.name)
        if allowed is None or value is None:
            continue
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v not in allowed:
                integer = str(f.type).startswith(("int", "list[int]"))
                what = "a positive integer" if integer and allowed.words == "positive" else str(allowed)
                raise TcaError(f"{flag_of(f)} must be {what}; got {v!r}.")
