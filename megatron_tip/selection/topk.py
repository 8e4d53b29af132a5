"""Exact distributed top-k and order statistics without gathering the data.

Floats are mapped to integers with the same order (IEEE-754 sign-magnitude → two's
complement), then an MSB-first radix select (8 bits per pass) finds the k-th largest key:
each pass all-reduces one 256-bin histogram of the remaining candidates per target, so a
float32 select costs 4 all-reduces of 2 KiB whatever N is. Ties at the threshold are split
by an exclusive prefix over ranks (all-gather of one int), lower rank then lower index
first. Several selects run in lockstep to share the same 4 all-reduces.

``group=None`` means a single process: same algorithm, no communication. Every rank runs
the same collectives in the same order whatever its data (empty ranks included); the
only data-dependent branches depend on all-reduced (global) values.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

_RADIX_BITS = 8
_NBINS = 1 << _RADIX_BITS


class Comm:
    """Collectives on an explicit group; a no-op stand-in when ``group`` is None."""

    def __init__(self, group: Optional[dist.ProcessGroup], device: torch.device) -> None:
        self.group = group
        self.device = device
        self.rank = dist.get_rank(group) if group is not None else 0
        self.size = dist.get_world_size(group) if group is not None else 1

    def all_reduce(self, t: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
        if self.group is not None:
            dist.all_reduce(t, op=op, group=self.group)
        return t

    def all_gather_int(self, value: int) -> list[int]:
        """One int64 per rank, in group-rank order."""
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        if self.group is None:
            return [value]
        out = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(out, t, group=self.group)
        return [int(o.item()) for o in out]


def _key_dtype(dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype, int]:
    if dtype == torch.float64:
        return torch.float64, torch.int64, 64
    if dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.float32, torch.int32, 32  # f16/bf16 → f32 is exact and order preserving
    raise TypeError(f"expected a floating-point tensor, got {dtype}")


def ordered_key(x: torch.Tensor) -> torch.Tensor:
    """Integers ordered like the floats ``x`` (no NaN); -0.0 and +0.0 map to the same key."""
    fdt, idt, width = _key_dtype(x.dtype)
    bits = (x.to(fdt) + 0.0).view(idt)  # +0.0 turns -0.0 into +0.0: both zeros tie, as in torch.topk
    return bits ^ ((bits >> (width - 1)) & ((1 << (width - 1)) - 1))


def key_to_float(key: int, width: int) -> float:
    """Inverse of :func:`ordered_key` for one signed key."""
    bits = key ^ ((1 << (width - 1)) - 1) if key < 0 else key
    idt, fdt = (torch.int32, torch.float32) if width == 32 else (torch.int64, torch.float64)
    return float(torch.tensor([bits], dtype=idt).view(fdt).item())


@dataclass
class _Select:
    """Result of one radix select on this rank."""
    key: int                 # signed key of the global k-th largest value
    above: torch.Tensor      # local indices with key > threshold
    ties: torch.Tensor       # local indices with key == threshold, ascending
    need: int                # how many of the global ties belong to the top-k (>= 1)


def radix_select(comm: Comm, keys: Sequence[torch.Tensor], valids: Sequence[torch.Tensor],
                 ks: Sequence[int], width: int) -> list[_Select]:
    """Find the k-th largest valid key of each target over the group (lockstep).

    keys[i]: int [N_i] from :func:`ordered_key`; valids[i]: bool [N_i]; ks[i] in
    [1, global valid count] (the caller checks, so every rank agrees).
    """
    T = len(keys)
    idx = [v.nonzero().flatten() for v in valids]
    ck = [k[i].to(torch.int64) for k, i in zip(keys, idx)]
    remaining = [int(k) for k in ks]
    above: list[list[torch.Tensor]] = [[] for _ in range(T)]
    prefix = [0] * T  # unsigned key bits found so far
    for p in range(width // _RADIX_BITS):
        shift = width - _RADIX_BITS * (p + 1)
        flip = (_NBINS >> 1) if p == 0 else 0  # the top digit carries the sign: flip it to unsign
        digits = [((c >> shift) & (_NBINS - 1)) ^ flip for c in ck]
        hist = torch.stack([torch.bincount(d, minlength=_NBINS) for d in digits]) if T else \
            torch.zeros(0, _NBINS, dtype=torch.int64)
        hist = comm.all_reduce(hist.to(comm.device)).cpu()
        for t in range(T):
            from_top = hist[t].flip(0).cumsum(0)
            j = int(torch.searchsorted(from_top, torch.tensor(remaining[t]), right=False))
            b = _NBINS - 1 - j
            remaining[t] -= int(from_top[j]) - int(hist[t, b])
            d = digits[t]
            above[t].append(idx[t][d > b])
            keep = d == b
            idx[t], ck[t] = idx[t][keep], ck[t][keep]
            prefix[t] = (prefix[t] << _RADIX_BITS) | b
    out = []
    for t in range(T):
        key = prefix[t] - (1 << (width - 1))  # unsigned → signed: flip the sign bit
        out.append(_Select(key, torch.cat(above[t]) if above[t] else idx[t][:0], idx[t], remaining[t]))
    return out


def _check_1d(scores: torch.Tensor, valid: torch.Tensor) -> None:
    if scores.dim() != 1 or valid.shape != scores.shape:
        raise ValueError(f"scores and valid must be 1-D of equal length, got {tuple(scores.shape)} "
                         f"and {tuple(valid.shape)}")
    if valid.dtype != torch.bool:
        raise ValueError(f"valid must be bool, got {valid.dtype}")


def distributed_topk_mask(scores: torch.Tensor, valid: torch.Tensor, k: int, *,
                          group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Mask of the k highest valid scores over all ranks of ``group``.

    scores: float [N]; valid: bool [N]; k: global number to keep (>= 0).
    Returns bool [N]. Equals the first k of a stable descending sort of the concatenation
    of every rank's valid scores in rank order (ties: lower rank, then lower index first);
    the kept values are those of ``torch.topk``. Fewer than k when fewer are valid.
    Raises ValueError on every rank if any rank has a NaN at a valid position.
    """
    _check_1d(scores, valid)
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be an int >= 0, got {k!r}")
    _, _, width = _key_dtype(scores.dtype)
    s = scores.detach()
    comm = Comm(group, s.device)
    n_nan_local = int((torch.isnan(s) & valid).sum())
    counts = comm.all_reduce(torch.tensor([int(valid.sum()), n_nan_local], dtype=torch.int64,
                                          device=s.device)).cpu()
    n_valid, n_nan = int(counts[0]), int(counts[1])
    if n_nan:  # every rank sees the same reduced count, so all raise together
        raise ValueError(f"distributed_topk_mask: {n_nan} NaN score(s) at valid positions across "
                         f"the group ({n_nan_local} on group rank {comm.rank})")
    if k == 0 or n_valid == 0:
        return torch.zeros_like(valid)
    if k >= n_valid:
        return valid.clone()
    sel = radix_select(comm, [ordered_key(s)], [valid], [k], width)[0]
    tie_counts = comm.all_gather_int(int(sel.ties.numel()))
    take = min(max(sel.need - sum(tie_counts[:comm.rank]), 0), tie_counts[comm.rank])
    mask = torch.zeros_like(valid)
    mask[sel.above.to(mask.device)] = True
    mask[sel.ties[:take].to(mask.device)] = True
    return mask


def quantile_positions(n: int, q: float) -> tuple[int, int, float]:
    """0-based ascending order-statistic indices and weight for ``torch.quantile`` (linear)."""
    pos = q * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1) if pos > lo else lo
    return lo, hi, pos - lo


def order_statistics(comm: Comm, requests: Sequence[tuple[torch.Tensor, torch.Tensor, int]],
                     n_totals: Sequence[int]) -> list[float]:
    """Exact global order statistics in one lockstep radix select.

    requests[i] = (values float [N], valid bool [N], j) with j the 0-based ascending index
    into the global sorted valid values; n_totals[i] = global valid count (> j).
    """
    if not requests:
        return []
    widths = {_key_dtype(v.dtype)[2] for v, _, _ in requests}
    if len(widths) != 1:
        raise TypeError("order_statistics: all requests must share one float width")
    width = widths.pop()
    sels = radix_select(comm, [ordered_key(v.detach()) for v, _, _ in requests],
                        [m for _, m, _ in requests],
                        [n - j for (_, _, j), n in zip(requests, n_totals)], width)
    return [key_to_float(s.key, width) for s in sels]


def global_quantiles(comm: Comm, requests: Sequence[tuple[torch.Tensor, float]], valid: torch.Tensor,
                     n_valid: int) -> list[float]:
    """Exact global quantiles (``torch.quantile`` linear) of several tensors sharing ``valid``, in one select.

    requests: (values, q) pairs, values shaped like ``valid``; ``n_valid``: the global valid count.
    NaN when n_valid == 0. Every rank must pass the same number of requests (they come from
    config, not data).
    """
    if n_valid == 0 or not requests:
        return [math.nan] * len(requests)
    plans = [quantile_positions(n_valid, float(q)) for _, q in requests]
    need = sorted({(i, j) for i, (lo, hi, _) in enumerate(plans) for j in (lo, hi)})
    flat_valid = valid.reshape(-1)
    vals = order_statistics(comm, [(requests[i][0].reshape(-1), flat_valid, j) for i, j in need],
                            [n_valid] * len(need))
    got = dict(zip(need, vals))
    return [got[(i, lo)] + w * (got[(i, hi)] - got[(i, lo)]) for i, (lo, hi, w) in enumerate(plans)]


def distributed_quantile(values: torch.Tensor, valid: torch.Tensor, qs: Sequence[float], *,
                         group: Optional[dist.ProcessGroup] = None) -> list[float]:
    """Exact global quantiles of the valid values (``torch.quantile`` linear definition).

    values: float [N]; valid: bool [N]; qs in [0, 1]. NaN when no rank has a valid value.
    Costs one scalar all-reduce plus 4 (float32) histogram all-reduces for all qs together.
    """
    _check_1d(values, valid)
    comm = Comm(group, values.device)
    n = int(comm.all_reduce(torch.tensor([int(valid.sum())], dtype=torch.int64,
                                         device=values.device)).item())
    return global_quantiles(comm, [(values, q) for q in qs], valid, n)
