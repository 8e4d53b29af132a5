"""Math answer grading: last ``\\boxed{...}`` extraction + equivalence via math-verify.

A grading failure (parse error, timeout, any exception inside math-verify) counts as wrong and
never raises: one odd completion must not crash an evaluation of thousands.
"""
from __future__ import annotations

import logging
import re
from functools import lru_cache

logger = logging.getLogger(__name__)

_BOXED = ("\\boxed", "\\fbox")
_INTEGER = re.compile(r"-?[0-9]+")


def extract_boxed(text: str) -> str | None:
    """Content of the LAST ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces balanced.

    Returns ``None`` when there is no complete boxed expression (e.g. a truncated completion).
    """
    pos = len(text)
    while True:
        start, name = max((text.rfind(b, 0, pos), b) for b in _BOXED)
        if start < 0:
            return None
        j = start + len(name)
        if text[j: j + 1] == "{":
            depth = 0
            for k in range(j, len(text)):
                depth += {"{": 1, "}": -1}.get(text[k], 0)
                if depth == 0:
                    return text[j + 1: k]
        elif text[j: j + 1] == " " and text[j:].split():
            # "\boxed 5" (no braces) is valid LaTeX for a single token.
            return text[j:].split()[0].rstrip("$.")
        pos = start  # unbalanced (truncated) last box: fall back to an earlier one


@lru_cache(maxsize=65536)
def _parse_gold(answer: str):
    from math_verify import parse

    return parse(f"${answer}$")


def _parse_pred(expr: str, timeout_seconds: int = 5):
    from math_verify import parse

    return parse(f"${expr}$", parsing_timeout=timeout_seconds)


def is_equiv(pred: str | None, gold: str, *, timeout_seconds: int = 5, string_match: bool = True) -> bool:
    """Whether the extracted answer ``pred`` equals reference ``gold`` via math-verify.

    With ``string_match`` an identical string (after stripping) short-circuits; otherwise
    ``verify(parse(gold), parse(pred))``. Errors and timeouts count as wrong.
    """
    if pred is None:
        return False
    if string_match and pred.strip() == gold.strip():
        return True
    if _INTEGER.fullmatch(pred.strip()) and _INTEGER.fullmatch(gold.strip()):
        return int(pred) == int(gold)  # what math-verify decides for two integers, ~1000x faster
    try:
        from math_verify import verify

        g, p = _parse_gold(gold), _parse_pred(pred, timeout_seconds)
        if not g or not p:
            return False
        return bool(verify(g, p, timeout_seconds=timeout_seconds, raise_on_error=False))
    except Exception as e:  # noqa: BLE001 - any grader failure is a wrong answer, never a crash
        logger.debug("grading failed for pred=%r gold=%r: %s", pred, gold, e)
        return False


def grade(completion: str, gold: str, *, timeout_seconds: int = 5, string_match: bool = True) -> bool:
    """Grade a full completion: extract its last ``\\boxed{}`` and compare to ``gold``."""
    try:
        return is_equiv(extract_boxed(completion), gold, timeout_seconds=timeout_seconds,
                        string_match=string_match)
    except Exception as e:  # noqa: BLE001
        logger.debug("grading crashed: %s", e)
        return False
