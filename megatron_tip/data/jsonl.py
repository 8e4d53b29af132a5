"""The one reader of problem files: JSONL rows with ``problem`` and ``answer`` fields."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional


def _numbered_rows(path: str | Path, what: str) -> list[tuple[int, object]]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = p.read_bytes()[: e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte {e.start})") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        except RecursionError:  # json's decoder recurses once per nesting level
            raise ValueError(f"{path}:{n}: JSON nested too deeply to read") from None
    if not rows:
        raise ValueError(f"{what} {path} is empty")
    return rows


def read_jsonl(path: str | Path, *, what: str = "data file") -> list:
    """Rows of a JSONL file; clear errors naming the file (and line) for a missing/empty file or a bad line."""
    return [row for _, row in _numbered_rows(path, what)]


def read_problems(path: str | Path, *, limit: Optional[int] = None, what: str = "prompt file") -> list[dict]:
    """``{problem, answer, ...}`` rows of a JSONL file (the first ``limit`` when given).

    Raises FileNotFoundError / ValueError naming the file and line of the first bad row.
    """
    rows = [row for _, row in numbered_problems(path, what=what)]
    return rows if limit is None else rows[:limit]


def _field_problem(row: dict) -> Optional[str]:
    """Why ``row``'s fields are unusable, or None: ``problem`` a string, ``answer`` a string or a finite number."""
    if not isinstance(row["problem"], str):
        return f"'problem' must be a string, got {_kind(row['problem'])}"
    answer = row["answer"]
    number = isinstance(answer, (int, float)) and not isinstance(answer, bool)
    if not (isinstance(answer, str) or (number and math.isfinite(answer))):
        return f"'answer' must be a string or a finite number, got {_kind(answer)}"
    return None


def _kind(value: object) -> str:
    """A short description of a JSON value (never its whole text: values can be huge)."""
    if value is None:
        return "null"
    if isinstance(value, float):
        return repr(value)  # nan / inf
    return {bool: "a boolean", list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def numbered_problems(path: str | Path, *, what: str = "prompt file") -> list[tuple[int, dict]]:
    """(line number, row) pairs of a problem file, validated like :func:`read_problems`."""
    rows = _numbered_rows(path, what)
    for n, row in rows:
        if not isinstance(row, dict) or "problem" not in row or "answer" not in row:
            got = sorted(row)[:20] if isinstance(row, dict) else _kind(row)
            raise ValueError(f"{path}:{n}: needs 'problem' and 'answer' fields, got {got}")
        bad = _field_problem(row)
        if bad:
            raise ValueError(f"{path}:{n}: {bad}")
    return rows
