"""Range checks shared by the config sections: each raises ValueError naming the field and what is allowed.

Types are already coerced by ``megatron_tip.config`` (from the dataclass annotations); these
check values, so a bad config fails at load time, before any model is built.
"""
from __future__ import annotations

import math
import reprlib
from typing import Any, Iterable, Optional


MAX_SHOWN = 80  # characters of a value an error message shows
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 3, MAX_SHOWN, MAX_SHOWN, MAX_SHOWN
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6


def short(value: Any, limit: int = MAX_SHOWN) -> str:
    """``repr(value)`` bounded to about ``limit`` characters, for messages: a config value can be huge (a YAML
    alias bomb, a pasted file), and formatting all of it would take the time and memory the error should save.
    ``reprlib`` stops at a few items per level and a few levels, so the cost is bounded too, not just the text."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fail(name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"{name}={short(value)}: must be {allowed}")


def one_of(name: str, value: Any, allowed: Iterable[Any]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise _fail(name, value, f"one of {', '.join(map(str, allowed))}")


def at_least(name: str, value: Optional[float], low: float, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if value is None or isinstance(value, bool) or not math.isfinite(value) or value < low:
        raise _fail(name, value, f">= {low:g}")


def in_range(name: str, value: float, low: float, high: float, *, low_open: bool = False,
             high_open: bool = False) -> None:
    """low <= value <= high (or open at either end)."""
    ok = (value is not None and not isinstance(value, bool) and math.isfinite(value)
          and (value > low if low_open else value >= low) and (value < high if high_open else value <= high))
    if not ok:
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise _fail(name, value, f"in {lo}{low:g}, {high:g}{hi}")


def int_range(name: str, value: int, low: int, high: int) -> None:
    """low <= value <= high for an integer field, the bounds written out in full (not as 4.29497e+09)."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _fail(name, value, f"an integer in [{low}, {high}]")
