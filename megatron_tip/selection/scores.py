"""Token scores: global-batch normalization, Soft-OR (Eq. 7), Q3 (§7.3), quadrants (Table 1).

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

from megatron_tip.selection.topk import Comm, ordered_key, order_statistics, quantile_positions

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


def global_quantiles(comm: Comm, requests: list[tuple[torch.Tensor, float]], valid: torch.Tensor,
                     n_valid: int) -> list[float]:
    """Exact global quantiles (torch.quantile linear) of several [B, S] tensors in one select.

    requests: (values, q) pairs sharing ``valid``. NaN when n_valid == 0. Every rank must
    pass the same number of requests (they come from config, not data).
    """
    if n_valid == 0 or not requests:
        return [math.nan] * len(requests)
    plans = [quantile_positions(n_valid, q) for _, q in requests]
    need = sorted({(i, j) for i, (lo, hi, _) in enumerate(plans) for j in (lo, hi)})
    flat_valid = valid.reshape(-1)
    vals = order_statistics(comm, [(requests[i][0].reshape(-1), flat_valid, j) for i, j in need],
                            [n_valid] * len(need))
    got = dict(zip(need, vals))
    return [got[(i, lo)] + w * (got[(i, hi)] - got[(i, lo)]) for i, (lo, hi, w) in enumerate(plans)]


def normalized_entropy_and_kl(norm_entropy: torch.Tensor, reverse_kl: torch.Tensor,
                              valid: torch.Tensor, *, group: Optional[dist.ProcessGroup] = None,
                              clip_percentile: float = 98.0, normalization: str = "minmax"
                              ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """ĥ, δ̂ fp32 [B, S] (0 where invalid) and the statistics used (global batch).

    minmax: ĥ = (min(h, h_p) − h_min) / (h_p − h_min) with h_p the ``clip_percentile``
    global percentile; δ̂ = min-max of reverse KL, no clip. rank: mid-rank ECDF of each
    (clipping does not change ranks beyond creating ties, so it is skipped).
    """
    comm = Comm(group, norm_entropy.device)
    st = global_stats(comm, [norm_entropy, reverse_kl], valid, what="soft_or_scores")
    if normalization == "rank":
        return (rank_normalize(norm_entropy, valid, group=group),
                rank_normalize(reverse_kl, valid, group=group), {})
    if normalization != "minmax":
        raise ValueError(f"normalization must be 'minmax' or 'rank', got {normalization!r}")
    (h_clip,) = global_quantiles(comm, [(norm_entropy, clip_percentile / 100.0)], valid, st.n_valid)
    h_hat = minmax_normalize(norm_entropy, valid, st.mins[0], h_clip)
    d_hat = minmax_normalize(reverse_kl, valid, st.mins[1], st.maxs[1])
    return h_hat, d_hat, {"h_clip": h_clip, "h_min": st.mins[0], "rkl_min": st.mins[1],
                          "rkl_max": st.maxs[1]}


def soft_or_scores(norm_entropy: torch.Tensor, reverse_kl: torch.Tensor, valid: torch.Tensor, *,
                   group: Optional[dist.ProcessGroup] = None, clip_percentile: float = 98.0,
                   normalization: str = "minmax") -> torch.Tensor:
    """Soft-OR score fp32 [B, S] (0 where invalid) with global-batch normalization.

    norm_entropy, reverse_kl: float [B, S]; valid: bool [B, S].
    """
    h_hat, d_hat, _ = normalized_entropy_and_kl(norm_entropy, reverse_kl, valid, group=group,
                                                clip_percentile=clip_percentile,
                                                normalization=normalization)
    return torch.where(valid, soft_or(h_hat, d_hat), torch.zeros_like(h_hat))


class Quadrants(NamedTuple):
    quadrant: torch.Tensor  # int8 [B, S]: 1..4, 0 where invalid
    h_threshold: float
    kl_threshold: float


def classify(norm_entropy: torch.Tensor, reverse_kl: torch.Tensor, valid: torch.Tensor,
             h_threshold: float, kl_threshold: float) -> torch.Tensor:
    """Quadrant ids int8 [B, S]; "high" means strictly above the threshold."""
    hi_h = norm_entropy > h_threshold
    hi_d = reverse_kl > kl_threshold
    q = torch.where(hi_h, torch.where(hi_d, 1, 2), torch.where(hi_d, 3, 4)).to(torch.int8)
    return torch.where(valid, q, torch.zeros_like(q))


def classify_quadrants(norm_entropy: torch.Tensor, reverse_kl: torch.Tensor, valid: torch.Tensor, *,
                       h_threshold: Optional[float] = None, kl_threshold: Optional[float] = None,
                       group: Optional[dist.ProcessGroup] = None) -> Quadrants:
    """Quadrants of Table 1: Q1 high h/high δ, Q2 high h/low δ, Q3 low h/high δ, Q4 low/low.

    Thresholds default to the exact global-batch medians (torch.quantile(·, 0.5)); a token
    is "high" when strictly above its threshold. Inputs float [B, S], valid bool [B, S].
    """
    comm = Comm(group, norm_entropy.device)
    st = global_stats(comm, [norm_entropy, reverse_kl], valid, what="classify_quadrants")
    reqs = [(t, 0.5) for t, thr in ((norm_entropy, h_threshold), (reverse_kl, kl_threshold)) if thr is None]
    med = iter(global_quantiles(comm, reqs, valid, st.n_valid))
    ht = float(h_threshold) if h_threshold is not None else next(med)
    kt = float(kl_threshold) if kl_threshold is not None else next(med)
    return Quadrants(classify(norm_entropy, reverse_kl, valid, ht, kt), ht, kt)
