"""Toy reasoning task: multi-digit addition solved column by column, ending in ``\\boxed{}``.

Example (``format_prompt(problem) + solution``)::

    Q: 478+356
    A: 8+6=14
    7+5+1=13
    4+3+1=8
    \\boxed{834}

Each solution line adds one column (rightmost first) plus the incoming carry; the carry shows up
as the ``+1`` term of the next line. The model must fetch the right digits of the operands,
add, carry and finally assemble the answer digits in reverse line order — enough steps that a
small student makes carry/copy mistakes a larger teacher does not.
"""
from __future__ import annotations

import functools

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

# Splits are disjoint by construction: every split draws from its own seed stream.
SPLIT_SEEDS = {"train": 1234, "heldout": 98765, "sft": 4242}
# The SFT scripts draw from these seeds (teacher, student); held-out problems exclude their first
# ``EXCLUDE_N`` problems, which covers every problem the shipped models were trained on.
SFT_SEEDS = (4242, 4243)
EXCLUDE_N = 100_000


@dataclass(frozen=True)
class Problem:
    """One addition problem with its step-by-step solution."""

    problem: str
    answer: str
    solution: str

    def to_json(self) -> dict:
        return {"problem": self.problem, "answer": self.answer, "solution": self.solution}


def format_prompt(problem: str) -> str:
    """The exact prompt the toy models were trained on; the completion is the solution."""
    return f"Q: {problem}\nA: "


def solve(a: int, b: int) -> str:
    """Column-by-column solution text for ``a + b`` ending in ``\\boxed{a+b}``."""
    da, db = str(a)[::-1], str(b)[::-1]
    lines, carry = [], 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        lines.append(f"{x}+{y}+1={s}" if carry else f"{x}+{y}={s}")
        carry = s // 10
    lines.append(f"\\boxed{{{a + b}}}")
    return "\n".join(lines)


def make_problem(a: int, b: int) -> Problem:
    """Build the :class:`Problem` for ``a + b``."""
    return Problem(problem=f"{a}+{b}", answer=str(a + b), solution=solve(a, b))


def generate_problems(n: int, *, seed: int, min_digits: int = 2, max_digits: int = 3) -> list[Problem]:
    """``n`` deterministic problems; each operand has ``min_digits..max_digits`` digits."""
    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"min_digits/max_digits: need 1 <= {min_digits} <= {max_digits}")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = (rng.randint(10 ** (d - 1) if d > 1 else 0, 10**d - 1)
                for d in (rng.randint(min_digits, max_digits), rng.randint(min_digits, max_digits)))
        out.append(make_problem(a, b))
    return out


@functools.lru_cache(maxsize=4)
def _training_problems(n: int, min_digits: int, max_digits: int) -> frozenset[str]:
    """Problems of the train split and SFT streams (their first n each); cached: it takes seconds."""
    return frozenset(p.problem for s in (SPLIT_SEEDS["train"], *SFT_SEEDS)
                     for p in generate_problems(n, seed=s, min_digits=min_digits, max_digits=max_digits))


def split_problems(split: str, n: int, *, min_digits: int = 2, max_digits: int = 3) -> list[Problem]:
    """Problems of a named split (``train``, ``heldout``, ``sft``).

    ``heldout`` is unique and excludes every problem of the train split and the SFT streams.
    """
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split: expected one of {sorted(SPLIT_SEEDS)}, got {split!r}")
    probs = generate_problems(n, seed=SPLIT_SEEDS[split], min_digits=min_digits, max_digits=max_digits)
    if split != "heldout":
        return probs
    # Over-generate, then drop any problem that also appears in the training streams.
    seen = set(_training_problems(max(4 * n, EXCLUDE_N), min_digits, max_digits))
    pool = generate_problems(4 * n, seed=SPLIT_SEEDS[split], min_digits=min_digits, max_digits=max_digits)
    out = []
    for p in pool:  # also drop repeats within the split, so held-out problems are unique
        if p.problem not in seen:
            seen.add(p.problem)
            out.append(p)
    return out[:n]


def write_jsonl(problems: Iterable[Problem], path: str | Path, *, with_solution: bool = True) -> Path:
    """Write problems as JSONL with ``problem``, ``answer`` (and ``solution``) fields."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for p in problems:
            row = p.to_json()
            if not with_solution:
                row.pop("solution")
            f.write(json.dumps(row) + "\n")
    return path
