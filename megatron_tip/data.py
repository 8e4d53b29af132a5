"""Prompts in, padded token batches out.

``PromptDataset`` reads a JSONL of {problem, answer}, formats and tokenizes every prompt once,
and hands out a deterministic order: step s of a run always sees the same prompts, so a resumed
run continues exactly where the interrupted one stopped. ``pack_rollouts`` turns rollouts into
the right-padded [B, S] tensors that the scoring and gradient passes share.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from megatron_tip.rollout.base import Rollout


@dataclass
class Prompt:
    problem: str
    answer: str
    ids: list[int]


def read_jsonl(path: str) -> list[dict]:
    """Rows of a JSONL file; clear errors for a missing/empty file or a bad line."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    rows = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    if not rows:
        raise ValueError(f"prompt file {path} is empty")
    return rows


class PromptDataset:
    """Tokenized prompts with a seeded, epoch-wise shuffled order."""

    def __init__(self, path: str, *, encode: Callable[[str], list[int]], max_prompt_len: int,
                 seed: int) -> None:
        rows = read_jsonl(path)
        self.prompts: list[Prompt] = []
        for n, row in enumerate(rows, 1):
            if "problem" not in row or "answer" not in row:
                raise ValueError(f"{path}:{n}: needs 'problem' and 'answer' fields, got {sorted(row)}")
            ids = encode(str(row["problem"]))
            if len(ids) > max_prompt_len:
                raise ValueError(f"{path}:{n}: prompt has {len(ids)} tokens, more than "
                                 f"data.max_prompt_len={max_prompt_len}")
            self.prompts.append(Prompt(str(row["problem"]), str(row["answer"]), ids))
        self.seed = seed

    def __len__(self) -> int:
        return len(self.prompts)

    def batch(self, step: int, *, size: int) -> list[Prompt]:
        """The ``size`` prompts of global step ``step`` (0-based), identical on every rank."""
        out = []
        for k in range(step * size, (step + 1) * size):
            epoch, pos = divmod(k, len(self.prompts))
            order = torch.randperm(len(self.prompts), generator=torch.Generator().manual_seed(self.seed + epoch))
            out.append(self.prompts[int(order[pos])])
        return out


@dataclass
class PackedBatch:
    """Right-padded rollouts. Position t of ``input_ids`` predicts ``target_ids[t]``."""

    input_ids: torch.Tensor  # [B, S] long
    target_ids: torch.Tensor  # [B, S] long (next token; pad at the end)
    valid: torch.Tensor  # [B, S] bool: t predicts a response token
    position_ids: torch.Tensor  # [B, S] long


def pack_rollouts(rollouts: list[Rollout], *, pad_id: int, seq_len: Optional[int] = None) -> PackedBatch:
    """Pack rollouts into fixed-width tensors (``seq_len`` defaults to the longest sequence)."""
    seqs = [r.prompt_ids + r.response_ids for r in rollouts]
    width = seq_len or max(len(s) for s in seqs)
    b = len(seqs)
    ids = torch.full((b, width + 1), pad_id, dtype=torch.long)
    valid = torch.zeros(b, width, dtype=torch.bool)
    for i, (r, s) in enumerate(zip(rollouts, seqs)):
        if len(s) > width:
            raise ValueError(f"rollout {i} has {len(s)} tokens, more than seq_len={width}")
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        p, m = len(r.prompt_ids), len(r.response_ids)
        valid[i, p - 1: p - 1 + m] = True  # logits at t predict token t+1
    pos = torch.arange(width).unsqueeze(0).expand(b, -1).contiguous()
    return PackedBatch(input_ids=ids[:, :-1].contiguous(), target_ids=ids[:, 1:].contiguous(),
                       valid=valid, position_ids=pos)
