"""Turn published training sets into the trainer's ``{problem, answer}`` JSONL.

    python -m megatron_tip.data.prepare dapo --in dapo-math-17k.parquet --out data/dapo_math_17k.jsonl

``dapo``: DAPO-Math-17k (the paper's training prompts, §7.1) as published
(BytedTsinghua-SIA/DAPO-Math-17k, ``data/dapo-math-17k.parquet``), or the same rows as JSONL.
The published file repeats its ~17k prompts ~100x (1.79M rows; BytedTsinghua-SIA/DAPO issue
#36); repeated (problem, answer) pairs are dropped unless ``--keep-duplicates``.
Each row holds ``prompt``: a chat list whose user message is DAPO's instruction, the problem,
and DAPO's reminder::

    Solve the following math problem step by step. The last line of your response should be of
    the form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\\n\\n
    <problem>\\n\\nRemember to put your answer on its own line after "Answer:".

and ``reward_model.ground_truth``: the answer. The instruction and reminder ask for an
``Answer:`` line, which conflicts with the ``\\boxed{}`` instruction the prompt builder appends
(``data.prompts.INSTRUCTION``) and the grader reads, so they are stripped; a row whose message
does not carry them is an error naming the row (``--keep-unmatched`` keeps its text as is).
Parquet needs ``pyarrow`` (``pip install -e .[data]``, in requirements/cpu.txt); JSONL needs nothing.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator

DAPO_PREFIX = ("Solve the following math problem step by step. The last line of your response should be of "
               "the form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n")
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'


def read_rows(path: str | Path) -> Iterator[dict]:
    """Rows of a ``.parquet`` file (pyarrow) or a JSONL file, as dicts."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"input file not found: {p}")
    if p.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ImportError(f"{p}: reading parquet needs pyarrow (pip install -e .[data]); or convert it "
                              f"to JSONL first") from e
        for batch in pq.ParquetFile(p).iter_batches(batch_size=8192):  # 1.79M rows: stream, do not load
            yield from batch.to_pylist()
        return
    with p.open() as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{p}:{n}: not valid JSON ({e.msg})") from None


def dapo_problem(prompt: Any, *, where: str, keep_unmatched: bool = False) -> str:
    """The problem text of one DAPO ``prompt`` (chat list), DAPO's instruction and reminder removed."""
    if isinstance(prompt, str):
        text = prompt
    else:
        users = [m.get("content", "") for m in (prompt or []) if isinstance(m, dict) and m.get("role") == "user"]
        if len(users) != 1:
            raise ValueError(f"{where}: prompt must be a chat list with one user message, got {prompt!r:.200}")
        text = users[0]
    matched = text.startswith(DAPO_PREFIX) and text.endswith(DAPO_SUFFIX)
    if matched:
        text = text[len(DAPO_PREFIX):len(text) - len(DAPO_SUFFIX)]
    elif not keep_unmatched:
        raise ValueError(f"{where}: the user message does not carry DAPO's answer-format instruction and "
                         f"reminder; pass --keep-unmatched to keep such rows verbatim")
    text = text.strip()
    if not text:
        raise ValueError(f"{where}: empty problem after stripping DAPO's instruction")
    return text


def dapo_rows(rows: Iterable[dict], *, source: str = "input", keep_unmatched: bool = False,
              dedup: bool = True) -> Iterator[dict]:
    """``{problem, answer}`` rows from DAPO-Math-17k rows (published layout); duplicates dropped if ``dedup``."""
    seen: set[tuple[str, str]] = set()
    for i, row in enumerate(rows):
        where = f"{source} row {i}"
        gt = (row.get("reward_model") or {}).get("ground_truth") if isinstance(row, dict) else None
        if gt is None or str(gt).strip() == "":
            raise ValueError(f"{where}: no reward_model.ground_truth")
        out = {"problem": dapo_problem(row.get("prompt"), where=where, keep_unmatched=keep_unmatched),
               "answer": str(gt).strip()}
        key = (out["problem"], out["answer"])
        if dedup and key in seen:
            continue
        seen.add(key)
        yield out


def write_jsonl(rows: Iterable[dict], path: str | Path) -> int:
    """Write rows as JSONL (creating parent folders); returns the row count."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with p.open("w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m megatron_tip.data.prepare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="dataset", required=True)
    d = sub.add_parser("dapo", help="DAPO-Math-17k (.parquet or .jsonl, published layout)")
    d.add_argument("--in", dest="inp", required=True, help="local copy of DAPO-Math-17k (.parquet or .jsonl)")
    d.add_argument("--out", required=True, help="output JSONL of {problem, answer}")
    d.add_argument("--keep-unmatched", action="store_true", help="keep rows without DAPO's instruction verbatim")
    d.add_argument("--keep-duplicates", action="store_true",
                   help="keep repeated (problem, answer) rows (the published file repeats its ~17k prompts ~100x)")
    args = ap.parse_args(argv)
    try:
        n = write_jsonl(dapo_rows(read_rows(args.inp), source=str(args.inp), keep_unmatched=args.keep_unmatched,
                                  dedup=not args.keep_duplicates), args.out)
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None  # a user error, as in train, eval and convert
    print(f"wrote {n} problems to {args.out}")
    return n


if __name__ == "__main__":
    main()
