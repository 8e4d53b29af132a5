"""Rollouts in, padded token batches out: the [B, S] tensors the scoring and gradient passes share."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_tip.rollout.base import Rollout


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


def microbatches(packed: PackedBatch, *, size: int) -> list[dict]:
    """Split [B, S] into micro-batches of ``size`` rows (the pipeline schedule needs one shape).

    The last one is padded with all-pad rows that count nowhere (``valid`` False); each dict
    has input_ids, position_ids, target_ids, valid ([size, S]) and ``rows`` (its slice of B).
    """
    b = packed.input_ids.shape[0]
    out = []
    for start in range(0, b, size):
        sl = slice(start, min(start + size, b))
        mb = {"input_ids": packed.input_ids[sl], "position_ids": packed.position_ids[sl],
              "target_ids": packed.target_ids[sl], "valid": packed.valid[sl], "rows": sl}
        short = size - mb["input_ids"].shape[0]
        if short:
            for k in ("input_ids", "position_ids", "target_ids", "valid"):
                mb[k] = torch.cat([mb[k], mb[k][:1].expand(short, -1).clone()])
            mb["valid"][-short:] = False
        out.append(mb)
    return out
