"""Token scores: global-batch statistics and normalization, Soft-OR (Eq. 7), Q3 (§7.3), quadrants (Table 1).

Normalization statistics span the valid tokens of the whole global batch (all ranks of
``group``) and are exact: min/max by all-reduce, percentiles/medians by the radix select
in :mod:`.topk` (``torch.quantile`` linear-interpolation definition). ``group=None`` means
a single process. Inputs are never modified.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from megatron_tip.selection.topk import Comm, global_quantiles, ordered_key

_RANK_BITS = 16  # rank normalization resolves values to the top 16 bits of their float32 key


def soft_or(h_hat: torch.Tensor, d_hat: torch.Tensor) -> torch.Tensor:
    """Soft-OR s = ĥ + δ̂ − ĥ·δ̂ (Eq. 7) of normalized scores in [0, 1]; any equal shapes."""
    return h_hat + d_hat - h_hat * d_hat


def q3_score(forward_kl: torch.Tensor, h_hat: torch.Tensor) -> torch.Tensor:
    """Q3 score w = forward KL · (1 − ĥ) (§7.3): high when confident yet the teacher disagrees."""
    return forward_kl * (1.0 - h_hat)


def minmax_normalize(x: torch.Tensor, valid: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """(min(x, hi) − lo) / (hi − lo) at valid positions, 0 elsewhere; all 0 when hi <= lo.

    A constant batch carries no ranking information, so it maps to 0 rather than NaN.
    """
    if not (hi > lo):
        return torch.zeros_like(x, dtype=torch.float32)
    y = (torch.clamp(x.float(), max=hi) - lo) / (hi - lo)
    return torch.where(valid, y.clamp(0.0, 1.0), torch.zeros_like(y))


def rank_normalize(x: torch.Tensor, valid: torch.Tensor, *,
                   group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Global mid-rank ECDF in [0, 1] of the valid values of ``x`` (any shape), 0 elsewhere.

    Values are bucketed by the top 16 bits of their order-preserving float32 key (relative
    resolution 2^-7) so one all-reduce of a 65,536-bin histogram suffices; values in one
    bucket share its mid-rank (below + (count − 1)/2) / (N − 1).
    """
    comm = Comm(group, x.device)
    key = ordered_key(x.detach().float())
    bucket = (((key >> (32 - _RANK_BITS)) & ((1 << _RANK_BITS) - 1)) ^ (1 << (_RANK_BITS - 1))).long()
    hist = torch.bincount(bucket[valid], minlength=1 << _RANK_BITS)
    hist = comm.all_reduce(hist.to(x.device)).cpu()
    n = int(hist.sum())
    below = (hist.cumsum(0) - hist).double()
    mid = below + (hist.double() - 1.0) / 2.0
    r = (mid / max(n - 1, 1)).float()[bucket.cpu()].to(x.device)
    return torch.where(valid, r, torch.zeros_like(r))


class GlobalStats(NamedTuple):
    """Global-batch statistics over valid tokens (identical on every rank)."""
    n_valid: int
    sums: list[float]       # per input
    mins: list[float]       # +inf when n_valid == 0
    maxs: list[float]       # -inf when n_valid == 0


def global_stats(comm: Comm, tensors: list[torch.Tensor], valid: torch.Tensor, *,
                 what: str = "selection") -> GlobalStats:
    """Count, sums, mins, maxs over valid positions; raises ValueError on every rank on NaN.

    Two all-reduces (SUM, MAX) whatever the data, so empty ranks take part identically.
    """
    n_local = int(valid.sum())
    sums, ext, nans = [], [], []
    for t in tensors:
        v = t.detach()[valid].double()
        nans.append(float(torch.isnan(v).sum()))
        sums.append(float(v.sum()) if v.numel() else 0.0)
        ext += [float(-v.min()) if v.numel() else -math.inf, float(v.max()) if v.numel() else -math.inf]
    dev = valid.device
    s = comm.all_reduce(torch.tensor([n_local] + nans + sums, dtype=torch.float64, device=dev)).cpu()
    e = comm.all_reduce(torch.tensor(ext, dtype=torch.float64, device=dev), op=dist.ReduceOp.MAX).cpu()
    k = len(tensors)
    n_nan = s[1:1 + k].tolist()
    if any(n_nan):  # reduced counts are identical everywhere: all ranks raise together
        local = {i: int(c) for i, c in enumerate(nans) if c}
        raise ValueError(f"{what}: NaN at valid positions across the group, per input {n_nan} "
                         f"(input index -> count on group rank {comm.rank}: {local})")
    e = e.tolist()
    return GlobalStats(int(s[0]), s[1 + k:].tolist(), [-e[2 * i] for i in range(k)],
                       [e[2 * i + 1] for i in range(k)])


class BatchStats(NamedTuple):
    """What selection needs from the global batch (identical on every rank)."""
    n_valid: int
    mean_h: float
    mean_rkl: float
    mean_fkl: float
    h_min: float
    h_max: float
    rkl_min: float
    rkl_max: float
    h_clip: float        # the entropy_clip_percentile of h (NaN under rank normalization)
    h_threshold: float   # quadrant boundaries (configured, or the exact global median)
    kl_threshold: float


def batch_stats(norm_entropy: torch.Tensor, reverse_kl: torch.Tensor, forward_kl: torch.Tensor,
                valid: torch.Tensor, *, comm: Comm, clip_percentile: Optional[float],
                h_threshold: Optional[float] = None, kl_threshold: Optional[float] = None) -> BatchStats:
    """Count, means, extrema, the entropy clip percentile and the quadrant thresholds of the batch.

    Inputs float [B, S], valid bool [B, S]. ``clip_percentile`` None skips the percentile; a
    threshold None is the exact global median. Collectives: 2 all-reduces plus one lockstep
    radix select (4 histogram all-reduces) for all percentiles together. Raises ValueError on
    every rank on a NaN at a valid position.
    """
    st = global_stats(comm, [norm_entropy, reverse_kl, forward_kl], valid, what="select_tokens")
    n = st.n_valid
    reqs = [(norm_entropy, clip_percentile / 100.0)] if clip_percentile is not None else []
    reqs += [(t, 0.5) for t, thr in ((norm_entropy, h_threshold), (reverse_kl, kl_threshold)) if thr is None]
    qv = iter(global_quantiles(comm, reqs, valid, n))
    h_clip = next(qv) if clip_percentile is not None else math.nan
    h_thr = float(h_threshold) if h_threshold is not None else next(qv)
    kl_thr = float(kl_threshold) if kl_threshold is not None else next(qv)
    mean = [x / n if n else 0.0 for x in st.sums]
    return BatchStats(n, *mean, st.mins[0], st.maxs[0], st.mins[1], st.maxs[1], h_clip, h_thr, kl_thr)


def normalize(norm_entropy: torch.Tensor, reverse_kl: torch.Tensor, valid: torch.Tensor, stats: BatchStats, *,
              normalization: str, group: Optional[dist.ProcessGroup] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ĥ, δ̂ fp32 [B, S] in [0, 1] (0 where invalid) over the global batch.

    minmax (paper): ĥ = (min(h, h_clip) − h_min) / (h_clip − h_min); δ̂ = min-max of reverse KL,
    no clip. rank: mid-rank ECDF of each (clipping only creates ties, so it is skipped).
    """
    if normalization == "rank":
        return rank_normalize(norm_entropy, valid, group=group), rank_normalize(reverse_kl, valid, group=group)
    if normalization != "minmax":
        raise ValueError(f"normalization must be 'minmax' or 'rank', got {normalization!r}")
    return (minmax_normalize(norm_entropy, valid, stats.h_min, stats.h_clip),
            minmax_normalize(reverse_kl, valid, stats.rkl_min, stats.rkl_max))


def classify(norm_entropy: torch.Tensor, reverse_kl: torch.Tensor, valid: torch.Tensor,
             h_threshold: float, kl_threshold: float) -> torch.Tensor:
    """Quadrant ids int8 [B, S] of Table 1 (0 where invalid); "high" means strictly above the threshold.

    Q1 high h/high δ, Q2 high h/low δ, Q3 low h/high δ, Q4 low h/low δ.
    """
    hi_h = norm_entropy > h_threshold
    hi_d = reverse_kl > kl_threshold
    q = torch.where(hi_h, torch.where(hi_d, 1, 2), torch.where(hi_d, 3, 4)).to(torch.int8)
    return torch.where(valid, q, torch.zeros_like(q))
