"""The one reader of problem files: JSONL rows with ``problem`` and ``answer`` fields."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


def _numbered_rows(path: str | Path, what: str) -> list[tuple[int, object]]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    rows = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
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


def numbered_problems(path: str | Path, *, what: str = "prompt file") -> list[tuple[int, dict]]:
    """(line number, row) pairs of a problem file, validated like :func:`read_problems`."""
    rows = _numbered_rows(path, what)
    for n, row in rows:
        if not isinstance(row, dict) or "problem" not in row or "answer" not in row:
            got = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise ValueError(f"{path}:{n}: needs 'problem' and 'answer' fields, got {got}")
    return rows
