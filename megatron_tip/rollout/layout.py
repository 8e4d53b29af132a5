"""Rollouts in, the token layout of one step out.

Two views of the same tokens:

- ``PaddedBatch`` [B, S_max]: every rollout right-padded to the step's longest sequence. Only
  integer ids and masks live at this width; the selection reads its statistics in this view
  (per-rollout rows, global positions), so its semantics do not depend on the layout below.
- ``microbatches``: what the forwards actually run on. Fixed-rows mode (``max_tokens=0``) slices
  ``size`` rows at the full step width, in rollout order (the layout before token budgets).
  Token-budget mode sorts rollouts by length (longest first), fills each micro-batch with
  consecutive rollouts while rows x its longest row <= ``max_tokens`` (and its padding stays
  within ``PAD_TOLERANCE``), and trims it to its own longest row, so few pad positions are
  computed. Each micro-batch maps back to the padded view
  through ``rows`` (rollout indices) and its width (positions 0..s-1 of those rows).
- ``packed_microbatches`` (THD, Transformer Engine spec): several rollouts concatenated in one
  row [1, T] by first-fit decreasing under the token budget, ``cu_seqlens`` marking where each
  starts, positions restarting at 0 per rollout; no pad position at all.

Every micro-batch maps each of its positions back to (rollout, position) of the padded view with
``src_rows`` / ``src_pos`` [b, s] (-1 where a position holds no rollout); ``from_padded`` and
``to_padded`` move tensors between the two views. Trimmed bins are exact for any attention:
every row keeps its own positions 0..len-1 and causal attention never reaches its right padding;
THD rows are exact when attention stops at ``cu_seqlens`` (docs/packing.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_tip.rollout.base import Rollout


@dataclass
class PaddedBatch:
    """Right-padded rollouts. Position t of ``input_ids`` predicts ``target_ids[t]``."""

    input_ids: torch.Tensor  # [B, S] long
    target_ids: torch.Tensor  # [B, S] long (next token; pad at the end)
    valid: torch.Tensor  # [B, S] bool: t predicts a response token
    position_ids: torch.Tensor  # [B, S] long
    lengths: torch.Tensor  # [B] long (host): input positions each row needs (prompt + response - 1)


def pad_rollouts(rollouts: list[Rollout], *, pad_id: int, seq_len: Optional[int] = None,
                 device: torch.device | str = "cpu") -> PaddedBatch:
    """Right-pad rollouts into [B, S] tensors on ``device`` (``seq_len`` defaults to the longest sequence).

    Rows are filled on the host and moved to ``device`` once.
    """
    seqs = [r.prompt_ids + r.response_ids for r in rollouts]
    width = seq_len or max(len(s) for s in seqs)
    b = len(seqs)
    ids = torch.full((b, width + 1), pad_id, dtype=torch.long, device="cpu")
    valid = torch.zeros(b, width, dtype=torch.bool, device="cpu")
    for i, (r, s) in enumerate(zip(rollouts, seqs)):
        if len(s) > width:
            raise ValueError(f"rollout {i} has {len(s)} tokens, more than seq_len={width}")
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long, device="cpu")
        p, m = len(r.prompt_ids), len(r.response_ids)
        valid[i, p - 1: p - 1 + m] = True  # logits at t predict token t+1
    lengths = torch.tensor([max(len(s) - 1, 1) for s in seqs], dtype=torch.long, device="cpu")  # host copy: bins are planned on the host
    ids, valid = ids.to(device), valid.to(device)
    pos = torch.arange(width, device=device).unsqueeze(0).expand(b, -1).contiguous()
    return PaddedBatch(input_ids=ids[:, :-1].contiguous(), target_ids=ids[:, 1:].contiguous(),
                       valid=valid, position_ids=pos, lengths=lengths)


# A bin takes the next (shorter) rollout only while its pad positions stay within this share of
# its real ones: the step's processed/real positions is then <= 1 + PAD_TOLERANCE (issue #22's target).
PAD_TOLERANCE = 0.05


def token_bins(lengths: list[int], *, max_tokens: int, pad_tolerance: float = PAD_TOLERANCE) -> list[list[int]]:
    """Row indices per micro-batch: longest first, consecutive rows while rows x longest <= ``max_tokens``
    and rows x longest <= (1 + ``pad_tolerance``) x the bin's real positions.

    Sorting makes each bin's rows nearly equal in length; both conditions only tighten as a bin
    takes shorter rows, so filling in order gives the fewest such bins. Ties keep rollout order
    (stable sort), so the layout is deterministic.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    real = 0
    for i in order:
        if lengths[i] > max_tokens:
            raise ValueError(f"rollout {i} needs {lengths[i]} positions, more than "
                             f"train.max_tokens_per_microbatch={max_tokens}")
        if bins:
            area = (len(bins[-1]) + 1) * lengths[bins[-1][0]]
            if area <= max_tokens and area <= (1 + pad_tolerance) * (real + lengths[i]):
                bins[-1].append(i)
                real += lengths[i]
                continue
        bins.append([i])
        real = lengths[i]
    return bins


def microbatches(batch: PaddedBatch, *, size: int, max_tokens: int = 0) -> list[dict]:
    """Micro-batch dicts: input_ids, position_ids, target_ids, valid, src_rows, src_pos ([b, s]) and ``rows``
    (long [n <= b]).

    ``rows[j]`` is the rollout (row of ``batch``) held in row j, at positions 0..s-1 of the
    padded view; rows past ``len(rows)`` are all-pad rows that count nowhere (``valid`` False,
    ``src_rows`` -1).
    ``max_tokens=0``: ``size`` rows at the full width, the last one padded to ``size`` rows
    (one shape for the pipeline schedule). ``max_tokens>0``: token-budget bins (``token_bins``),
    each trimmed to its longest row; shapes differ between micro-batches.
    """
    b, width = batch.input_ids.shape
    device = batch.input_ids.device
    if max_tokens:
        groups = [(rows, int(batch.lengths[rows[0]])) for rows in token_bins(batch.lengths.tolist(),
                                                                          max_tokens=max_tokens)]
    else:
        groups = [(list(range(s, min(s + size, b))), width) for s in range(0, b, size)]
    out = []
    for rows, w in groups:
        idx = torch.tensor(rows, dtype=torch.long, device=device)
        mb = {k: getattr(batch, k)[idx, :w] for k in ("input_ids", "position_ids", "target_ids", "valid")}
        short = 0 if max_tokens else size - len(rows)
        if short:
            for k in ("input_ids", "position_ids", "target_ids", "valid"):
                mb[k] = torch.cat([mb[k], mb[k][:1].expand(short, -1).clone()])
            mb["valid"][-short:] = False
        mb["rows"] = idx
        src = torch.full((len(rows) + short, w), -1, dtype=torch.long, device=device)
        src[: len(rows)] = idx[:, None]
        mb["src_rows"] = src
        mb["src_pos"] = torch.arange(w, device=device).expand(src.shape[0], -1).contiguous()
        out.append(mb)
    return out


def first_fit_decreasing(lengths: list[int], *, max_tokens: int) -> list[list[int]]:
    """Row indices per packed row: longest first, each into the first row with room (Σ lengths <= ``max_tokens``).

    Ties keep rollout order (stable sort), so the layout is deterministic.
    """
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if lengths[i] > max_tokens:
            raise ValueError(f"rollout {i} needs {lengths[i]} positions, more than "
                             f"train.max_tokens_per_microbatch={max_tokens}")
        for j, r in enumerate(room):
            if lengths[i] <= r:
                bins[j].append(i)
                room[j] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(max_tokens - lengths[i])
    return bins


def packed_microbatches(batch: PaddedBatch, *, max_tokens: int) -> list[dict]:
    """THD micro-batches: input_ids, position_ids, target_ids, valid, src_rows, src_pos [1, T], T <= ``max_tokens``.

    Row 0 concatenates positions 0..len-1 of each rollout in ``rows`` (first-fit decreasing);
    ``cu_seqlens`` (int32 [n+1]) holds where each starts, ``max_seqlen`` the longest. Positions
    restart at 0 per rollout; no position is padding.
    """
    device = batch.input_ids.device
    lengths = batch.lengths.tolist()
    out = []
    for rows in first_fit_decreasing(lengths, max_tokens=max_tokens):
        host = torch.device("cpu")  # the index building runs on the host, then moves to the batch's device
        lens = torch.tensor([lengths[i] for i in rows], dtype=torch.long, device=host)
        src_rows = torch.repeat_interleave(torch.tensor(rows, dtype=torch.long, device=host), lens)
        src_pos = torch.cat([torch.arange(n, device=host) for n in lens.tolist()])
        cu = torch.zeros(len(rows) + 1, dtype=torch.int32, device=host)
        cu[1:] = torch.cumsum(lens, 0)
        src_rows, src_pos = src_rows.to(device), src_pos.to(device)
        mb = {k: getattr(batch, k)[src_rows, src_pos][None] for k in ("input_ids", "target_ids", "valid")}
        mb["position_ids"] = src_pos[None]
        mb.update(rows=torch.tensor(rows, dtype=torch.long, device=device), src_rows=src_rows[None],
                  src_pos=src_pos[None], cu_seqlens=cu.to(device), max_seqlen=int(lens.max()))
        out.append(mb)
    return out


def step_microbatches(batch: PaddedBatch, *, size: int, max_tokens: int = 0, packing: str = "bins") -> list[dict]:
    """The step's layout: ``microbatches`` (fixed rows, or trimmed bins when ``max_tokens``) or,
    with ``packing="thd"`` and a budget, ``packed_microbatches``."""
    if packing == "thd" and max_tokens:
        return packed_microbatches(batch, max_tokens=max_tokens)
    return microbatches(batch, size=size, max_tokens=max_tokens)


def from_padded(mb: dict, padded: torch.Tensor) -> torch.Tensor:
    """The values of a padded-view tensor [B, S, ...] at the micro-batch's positions -> [b, s, ...]
    (0 / False where none)."""
    rows, pos = mb["src_rows"], mb["src_pos"]
    keep = rows >= 0
    out = torch.zeros(*rows.shape, *padded.shape[2:], dtype=padded.dtype, device=padded.device)
    out[keep] = padded[rows[keep], pos[keep]]
    return out


def to_padded(mb: dict, values: torch.Tensor, padded: torch.Tensor) -> None:
    """Write a micro-batch's values [b, s] into the padded view ``padded`` [B, S] (in place) at their positions."""
    rows, pos = mb["src_rows"], mb["src_pos"]
    keep = rows >= 0
    padded[rows[keep], pos[keep]] = values[keep]


def processed_tokens(mbs: list[dict]) -> int:
    """Positions the forwards compute over ``mbs`` (pad positions included): Σ b x s."""
    return sum(mb["input_ids"].numel() for mb in mbs)
