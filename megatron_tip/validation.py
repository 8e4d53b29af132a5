"""Range checks shared by the config sections: each raises ValueError naming the field and what is allowed.

Types are already coerced by ``megatron_tip.config`` (from the dataclass annotations); these
check values, so a bad config fails at load time, before any model is built.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Optional


def _fail(name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"{name}={value!r}: must be {allowed}")


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
